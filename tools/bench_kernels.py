"""Benchmark the log-prob + entropy ops against the torch reference and, where installed, Liger.

For each op, shape and provider, two passes: ``forward`` (no autograd graph, as when the RL step
computes old or reference log-probs) and ``forward+backward`` (the training step, a loss that
weighs both outputs). Each reports the median time, the peak memory allocated above the inputs
(``peak``) and the part of it that is neither an output nor a gradient (``extra``), the achieved
rate, and the fraction of the device's floor reached:

- ``logprob_entropy`` (op 1) is memory-bound: it moves ``N x V x s`` bytes forward (the logits
  read once) and ``3 x N x V x s`` forward+backward (read twice, the gradient written once), ``s``
  the element size; floor = bytes / the copy bandwidth measured here.
- ``fused_linear_logprob_entropy`` (op 2) is compute-bound: ``2 N H V`` FLOPs forward, ``8 N H V``
  forward+backward; floor = FLOPs / the matmul rate measured here (bf16 on CUDA; fp32 on the CPU,
  where the torch path multiplies in fp32).

``--phases``: the ``megarl`` providers' passes also timed phase by phase (``stats``,
``grad-logits``, ``dW``, ``dX``: :data:`megarl.kernels.common.PHASES`, recorded by the ops
themselves with CUDA events on CUDA and ``time.perf_counter`` on the CPU; the median of each over
``--iters`` runs), each with its rate: op 2's phases are one ``2 N H V`` product each (the logits,
recomputed in ``grad-logits``), op 1's ``stats`` reads ``N x V x s`` bytes and its ``grad-logits``
moves ``2 x N x V x s``. On CUDA the JSON also names the configuration each autotuner chose
(``autotune``; ``MEGARL_AUTOTUNE=first`` leaves one candidate per kernel).

The providers: ``megarl`` (the public functions, ``backend="auto"``: the Triton kernels on CUDA,
the chunked torch path on the CPU), ``megarl-tp1`` (the same functions called as the trainer
calls them, ``megarl/trainer/policy.py``: a micro-batch ``[1, N, ...]``, ``vocab_size`` given and
the tensor-parallel group, here a process group of this one process, gloo on the CPU and NCCL on
CUDA; not in the default list), ``torch`` (the naive reference: whole logits in fp32,
``log_softmax``, gather, ``-sum p log p``) and ``liger`` (op 2 only, CUDA only, when
``liger-kernel`` is installed: its fused linear cross-entropy, which computes no entropy).

Examples::

    python tools/bench_kernels.py --json bench.json       # CUDA: the shapes of docs/benchmarks.md
    python tools/bench_kernels.py --device cpu --shapes 512,512,32768 --json bench_cpu.json
    python tools/bench_kernels.py --shapes 16384,4096,151936 --providers megarl megarl-tp1 torch liger
    MEGARL_AUTOTUNE=first python tools/bench_kernels.py --shapes 16384,4096,151936 --phases --providers megarl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import triton

from megarl.kernels import fused_linear_logprob_entropy_triton as fused_kernels
from megarl.kernels import logprob_entropy as logits_kernels
from megarl.kernels import matmul_accumulate
from megarl.kernels.common import timing_phases
from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy
from megarl.kernels.logprob_entropy import logprob_entropy

OPS = ("logprob_entropy", "fused_linear_logprob_entropy")
PROVIDERS = ("megarl", "megarl-tp1", "torch", "liger")
DEFAULT_PROVIDERS = ("megarl", "torch", "liger")
PASSES = ("forward", "forward+backward")
DEFAULT_SHAPES = ("16384,4096,151936", "8192,2048,151936")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PHASED_PROVIDERS = ("megarl", "megarl-tp1")
TUNED_KERNELS = {
    "logprob_entropy._stats_kernel": logits_kernels._stats_kernel_tuned,
    "logprob_entropy._backward_kernel": logits_kernels._backward_kernel_tuned,
    "fused._stats_kernel": fused_kernels._stats_kernel_tuned,
    "fused._grad_logits_kernel": fused_kernels._grad_logits_kernel_tuned,
    "matmul_accumulate._matmul_accumulate_kernel": matmul_accumulate._matmul_accumulate_kernel_tuned,
}


# ----------------------------------------------------------------------------------------------
# Providers: each maps the op's inputs to (log_probs, entropy), or to a loss for Liger
# ----------------------------------------------------------------------------------------------


def torch_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor):
    """The naive reference: ``logits: [N, V]`` -> ``(log_probs [N], entropy [N])`` in fp32."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(dim=-1)


def torch_fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The naive reference on ``hidden @ weight.T`` (the whole ``[N, V]`` logits)."""
    return torch_logprob_entropy(hidden @ weight.T, targets)


def liger_fused_linear_cross_entropy():
    """Liger's fused linear cross-entropy as ``(hidden, weight, targets) -> loss``, or ``None``."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


def one_rank_group(device: torch.device) -> dist.ProcessGroup:
    """A tensor-parallel group of this process alone, made as Megatron makes its groups
    (``new_group``) inside a default group of one rank (NCCL on CUDA, gloo on the CPU) on a free
    local port."""
    if not dist.is_initialized():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    return dist.new_group([dist.get_rank()])


def trainer_call(op: str, group: dist.ProcessGroup):
    """``megarl-tp1``: the op as the trainer calls it (``Policy._log_probs_and_entropy``): the
    rows as one packed micro-batch ``[1, N, ...]``, the vocabulary size and the tensor-parallel
    ``group`` given, the logits divided by the sampling temperature (1 here)."""
    if op == "logprob_entropy":
        def call(logits, targets):
            return logprob_entropy(logits[None], targets[None], temperature=1.0, vocab_size=logits.shape[-1], group=group)
    else:
        def call(hidden, weight, targets):
            return fused_linear_logprob_entropy(
                hidden[None], weight, targets[None], temperature=1.0, vocab_size=weight.shape[0], group=group
            )
    return call


def providers(op: str, device: torch.device, group: dist.ProcessGroup | None = None) -> tuple[dict, dict]:
    """``({name: function}, {name: why it is skipped})`` for ``op`` on ``device``; ``megarl-tp1``
    among them when a one-rank tensor-parallel ``group`` is given."""
    trainer = {"megarl-tp1": trainer_call(op, group)} if group is not None else {}
    if op == "logprob_entropy":
        return {"megarl": logprob_entropy, **trainer, "torch": torch_logprob_entropy}, {"liger": "no log-prob + entropy op"}
    functions = {"megarl": fused_linear_logprob_entropy, **trainer, "torch": torch_fused}
    liger = liger_fused_linear_cross_entropy()
    if device.type != "cuda":
        return functions, {"liger": "CUDA only"}
    if liger is None:
        return functions, {"liger": "liger-kernel is not installed"}
    return {**functions, "liger": liger}, {}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``function()`` over ``iters`` runs after ``warmup`` (autotuning) runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(function, device: torch.device) -> int:
    """The most memory allocated at once while ``function()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak. CPU: the allocator's running total at every allocation,
    read from the profiler's event tree (a private torch API: the only per-allocation CPU record).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    events, allocations = list(profile.profiler.kineto_results.experimental_event_tree()), []
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    if not allocations:
        return 0
    allocations.sort()
    before = allocations[0][1] - allocations[0][2]
    return max(total for _, total, _ in allocations) - before


def measure_bandwidth(device: torch.device, warmup: int, iters: int) -> float:
    """Copy bandwidth in bytes/s (read + write) of a buffer far larger than any cache."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    return 2 * size / median_seconds(lambda: target.copy_(source), device, warmup, iters)


def measure_matmul(device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> float:
    """Matmul rate in FLOP/s of a large square product in ``dtype``."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, warmup, iters)


# ----------------------------------------------------------------------------------------------
# One op on one shape
# ----------------------------------------------------------------------------------------------


def make_inputs(op: str, n: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """``(differentiable inputs, targets, (dL/dlog_probs, dL/dentropy))`` with a model's spread."""
    generator = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, vocab, (n,), device=device, generator=generator)
    loss_weights = torch.randn(2, n, device=device, generator=generator)
    if op == "logprob_entropy":
        tensors = [3 * torch.randn(n, vocab, device=device, generator=generator, dtype=dtype)]
    else:
        tensors = [
            torch.randn(n, hidden_size, device=device, generator=generator, dtype=dtype),
            torch.randn(vocab, hidden_size, device=device, generator=generator, dtype=dtype) * hidden_size**-0.5,
        ]
    return [tensor.requires_grad_() for tensor in tensors], targets, loss_weights


def make_step(function, tensors, targets, loss_weights, backward: bool):
    """One pass of ``function``: forward without a graph, or forward and backward of a loss."""

    def forward():
        with torch.no_grad():
            function(*(tensor.detach() for tensor in tensors), targets)

    def forward_backward():
        outputs = function(*tensors, targets)
        loss = outputs if isinstance(outputs, torch.Tensor) else (loss_weights[0] * outputs[0]).sum() + (
            loss_weights[1] * outputs[1]
        ).sum()
        loss.backward()
        for tensor in tensors:
            tensor.grad = None

    return forward_backward if backward else forward


def work(op: str, n: int, hidden_size: int, vocab: int, element_size: int, backward: bool) -> tuple[float, str]:
    """The pass's ideal work: bytes moved (op 1) or FLOPs (op 2), see the module docstring."""
    if op == "logprob_entropy":
        return (3 if backward else 1) * n * vocab * element_size, "bytes"
    return (8 if backward else 2) * n * hidden_size * vocab, "flop"


def phase_work(op: str, phase_name: str, n: int, hidden_size: int, vocab: int, element_size: int) -> tuple[float, str]:
    """One phase's ideal work (see ``--phases`` in the module docstring)."""
    if op == "logprob_entropy":
        return (1 if phase_name == "stats" else 2) * n * vocab * element_size, "bytes"
    return 2 * n * hidden_size * vocab, "flop"


def measure_phases(op, step, shape, element_size, iters: int) -> dict:
    """``{phase: {"time_ms", "work", "work_unit", "achieved", "achieved_unit"}}``: the median of
    each phase's time over ``iters`` runs of ``step`` (already warm)."""
    runs = []
    for _ in range(iters):
        with timing_phases() as timer:
            step()
            runs.append(timer.seconds())
    phases = {}
    for name in dict.fromkeys(name for run in runs for name in run):
        seconds = statistics.median(run.get(name, 0.0) for run in runs)
        amount, unit = phase_work(op, name, *shape, element_size)
        phases[name] = {
            "time_ms": seconds * 1e3, "work": amount, "work_unit": unit,
            "achieved": amount / seconds / (1e9 if unit == "bytes" else 1e12) if seconds > 0 else 0.0,
            "achieved_unit": "GB/s" if unit == "bytes" else "TFLOP/s",
        }
    return phases


def autotune_choices() -> dict[str, list[dict[str, str]]]:
    """The configuration each autotuner chose, per key it has seen (empty before any CUDA run)."""
    return {
        name: [{"key": str(key), "config": str(config)} for key, config in kernel.cache.items()]
        for name, kernel in TUNED_KERNELS.items() if kernel.cache
    }


def bench_case(op, provider, function, shape, dtype, device, floors, warmup, iters, phases: bool = False) -> dict:
    n, hidden_size, vocab = shape
    tensors, targets, loss_weights = make_inputs(op, n, hidden_size, vocab, dtype, device)
    element_size = tensors[0].element_size()
    results = []
    for pass_name in PASSES:
        backward = pass_name == "forward+backward"
        result = {"op": op, "provider": provider, "n": n, "hidden": hidden_size, "vocab": vocab, "pass": pass_name}
        step = make_step(function, tensors, targets, loss_weights, backward)
        try:
            seconds = median_seconds(step, device, warmup, iters)
            peak = peak_bytes(step, device)
        except torch.OutOfMemoryError:
            results.append({**result, "error": "out of memory"})
            continue
        # What any provider must hold at the end: the outputs (two fp32 [N]) and the gradients.
        result_bytes = 2 * n * 4 + (sum(tensor.numel() for tensor in tensors) * element_size if backward else 0)
        amount, unit = work(op, n, hidden_size, vocab, element_size, backward)
        floor_rate = floors["bandwidth_bytes_per_s"] if unit == "bytes" else floors["matmul_flop_per_s"]
        results.append({
            **result,
            "time_ms": seconds * 1e3,
            "peak_bytes": peak,
            "extra_bytes": peak - result_bytes,
            "work": amount,
            "work_unit": unit,
            "achieved": amount / seconds / (1e9 if unit == "bytes" else 1e12),
            "achieved_unit": "GB/s" if unit == "bytes" else "TFLOP/s",
            "floor_ms": amount / floor_rate * 1e3,
            "fraction_of_floor": amount / floor_rate / seconds,
        })
        if phases and provider in PHASED_PROVIDERS:
            results[-1]["phases"] = measure_phases(op, step, shape, element_size, iters)
    return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, hidden_size, vocab = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be N,H,V (three integers), e.g. 16384,4096,151936")
    return n, hidden_size, vocab


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="N,H,V", help="tokens, hidden size, vocabulary (op 1 ignores H)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(DEFAULT_PROVIDERS),
                        help="megarl-tp1: the trainer's vocab-parallel call with a one-rank group (default: "
                        + " ".join(DEFAULT_PROVIDERS) + ")")
    parser.add_argument("--warmup", type=int, default=None, help="runs before timing (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the megarl providers phase by phase (stats, grad-logits, dW, dX)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; pass --device cpu (with small --shapes)")
    cuda = args.device == "cuda"
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.iters = (10 if cuda else 3) if args.iters is None else args.iters
    if args.iters < 1:
        parser.error(f"--iters ({args.iters}) must be at least 1")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def format_table(results: list[dict]) -> str:
    header = ("op", "N,H,V", "provider", "pass", "time ms", "peak MiB", "extra MiB", "achieved", "of floor")
    rows = []
    for result in results:
        shape = f"{result['n']},{result['hidden']},{result['vocab']}"
        if "error" in result:
            rows.append((result["op"], shape, result["provider"], result["pass"], result["error"], "", "", "", ""))
            continue
        rows.append((
            result["op"], shape, result["provider"], result["pass"],
            f"{result['time_ms']:.3f}", f"{result['peak_bytes'] / 2**20:.1f}", f"{result['extra_bytes'] / 2**20:.1f}",
            f"{result['achieved']:.3g} {result['achieved_unit']}", f"{100 * result['fraction_of_floor']:.1f} %",
        ))
    return aligned_table(header, rows)


def aligned_table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def format_phases(results: list[dict]) -> str:
    """The ``--phases`` table: each phase's time, rate and share of its pass's median time."""
    header = ("op", "N,H,V", "provider", "pass", "phase", "time ms", "achieved", "of pass")
    rows = []
    for result in results:
        for name, entry in result.get("phases", {}).items():
            rows.append((
                result["op"], f"{result['n']},{result['hidden']},{result['vocab']}", result["provider"], result["pass"],
                name, f"{entry['time_ms']:.3f}", f"{entry['achieved']:.3g} {entry['achieved_unit']}",
                f"{100 * entry['time_ms'] / result['time_ms']:.1f} %",
            ))
    return aligned_table(header, rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    # The torch path on the CPU multiplies in fp32 whatever the input dtype.
    matmul_dtype = dtype if device.type == "cuda" else torch.float32
    floors = {
        "bandwidth_bytes_per_s": measure_bandwidth(device, args.warmup, args.iters),
        "matmul_flop_per_s": measure_matmul(device, matmul_dtype, args.warmup, args.iters),
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
    }
    group = one_rank_group(device) if "megarl-tp1" in args.providers else None
    results, skipped = [], []
    for shape in args.shapes:
        for op in args.ops:
            functions, unavailable = providers(op, device, group)
            skipped += [{"op": op, "provider": name, "reason": why} for name, why in unavailable.items()
                        if name in args.providers]
            for name in args.providers:
                if name in functions:
                    results += bench_case(op, name, functions[name], shape, dtype, device, floors, args.warmup,
                                          args.iters, args.phases)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if group is not None:
        dist.destroy_process_group()
    report = {
        "device": device_name(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "warmup": args.warmup,
        "iters": args.iters,
        "floors": floors,
        "results": results,
        "skipped": skipped,
        "autotune_mode": os.environ.get("MEGARL_AUTOTUNE", "all"),
        "autotune": autotune_choices(),
    }
    print(f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}; {args.dtype}")
    print(f"floors: copy bandwidth {floors['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{floors['matmul_dtype']} matmul {floors['matmul_flop_per_s'] / 1e12:.3f} TFLOP/s")
    print(format_table(results))
    if args.phases:
        print(format_phases(results))
    for entry in skipped:
        print(f"skipped: {entry['provider']} for {entry['op']}: {entry['reason']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
