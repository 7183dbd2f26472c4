"""Measure the cost of megarl's CPU compatibility layer for megatron-core.

The only part of :mod:`megarl.megatron_compat` with a per-op cost is the torch-function mode that
redirects explicit CUDA placements to the CPU: every torch call made while it is on the stack
passes through its Python ``__torch_function__`` (Megatron's transformer layers run with it off
the stack). This script times forward+backward of a bundled tiny model on the CPU as every CPU
run has the layer, and with the mode removed altogether (the direct model call needs no CUDA
redirects), alternating the two step by step so that a change in the machine's load reaches both
alike; it prints the medians and optionally writes JSON.

    python tools/bench_megatron_cpu.py [--model bundled:tiny-moe] [--steps 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.overrides import _pop_mode_temporarily

from megarl import megatron_compat, parallel, platform
from megarl.config import ParallelConfig, resolve_model_path
from megarl.models.builder import build_model, model_spec
from megarl.models.loader import load_hf_config


def time_step(model, tokens, positions, labels) -> float:
    """Seconds of one forward+backward pass."""
    start = time.perf_counter()
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    return time.perf_counter() - start


def time_steps(model, tokens, positions, labels, steps: int) -> tuple[list[float], list[float]]:
    """``(with_compat, without_compat)``: ``steps`` timings each, taken in alternation."""
    with_mode, without_mode = [], []
    for _ in range(steps):
        with_mode.append(time_step(model, tokens, positions, labels))
        with _pop_mode_temporarily():
            without_mode.append(time_step(model, tokens, positions, labels))
    return with_mode, without_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:tiny-moe")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    platform.init_distributed()
    pg_collection = parallel.initialize(ParallelConfig())
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    hf_config = load_hf_config(resolve_model_path(args.model))
    model = build_model(model_spec(hf_config, ParallelConfig()), "torch", pg_collection)[0]
    tokens = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)

    time_steps(model, tokens, positions, labels, 3)  # warm-up
    with_mode, without_mode = time_steps(model, tokens, positions, labels, args.steps)
    with_ms = statistics.median(with_mode) * 1e3
    without_ms = statistics.median(without_mode) * 1e3
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "step_ms_with_compat": with_ms,
        "step_ms_without_compat": without_ms,
        "overhead_ms": with_ms - without_ms,
        "overhead_pct": 100 * (with_ms - without_ms) / without_ms,
        "compat_enabled": megatron_compat.cpu_enabled(),
    }
    print(f"{'model':<18}{'tokens':>8}{'with compat ms':>16}{'without ms':>12}{'overhead':>12}")
    print(
        f"{args.model:<18}{args.batch * args.seq:>8}{with_ms:>16.2f}{without_ms:>12.2f}"
        f"{result['overhead_pct']:>11.1f}%"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
