"""Weight-sync benchmark: the C++ resharding engine vs a pure-torch per-tensor path vs plain copies.

A synthetic Qwen3-MoE (default 8 layers x 64 experts, hidden 1024, expert FFN 640: 1.1 B
parameters, 2.2 GB in bf16) is sharded in one process as a TP2 / EP2 layout holds it (experts
split over ETP = TP = 2; EP only decides which rank holds an expert, so in one process it changes
nothing), in one flat buffer like Megatron's parameter buffer. Each step turns the shards into HF
tensors in buckets of ``--bucket-mb``, measured side by side in one run:

- ``engine``: the weight stream's plans, one ``execute_copy_plan`` call per bucket;
- ``torch``: what peers do per tensor: ``torch.cat`` the TP shards, view/split QKV groups and
  gate/up halves, drop vocab padding, cast, copy into the bucket;
- ``separate``: the engine on the same copies reordered TP shard by TP shard, so that a
  row-parallel weight's shards no longer come together and the engine writes their stretches of
  each row in separate passes (what its row grouping saves);
- ``copy_`` and ``memmove``: the same number of bytes copied from the flat buffer into the
  buckets, one call per bucket, with ``Tensor.copy_`` (all threads) and with libc's ``memmove``
  (one thread; glibc writes copies this large with streaming stores). The faster of the two is
  the floor on this machine.

It also reports the planning cost (the first step builds the plans; later steps reuse them) and
whether the stream's double buffering overlaps filling bucket k+1 with a consumer holding bucket k.

On a GPU (``--device cuda``) the shards and buckets live in device memory, the engine is the CUDA
kernel (one launch per bucket), ``copy_`` is a device-to-device copy and the floor, and there is
no ``memmove``; every step ends with a device synchronisation.

    python tools/bench_weight_sync.py [--layers 8 --experts 64 ...] [--bucket-mb 512] [--json FILE]
    python tools/bench_weight_sync.py --device cuda --layers 32 --json sync_gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time

import torch
import transformers

from megarl.models.builder import padded_vocab_size
from megarl.models.families import family_of
from megarl.models.mapping import FusedGateUp, FusedQKV, VocabParallel
from megarl.weights.bucket import Bucket
from megarl.weights.copy_plan import SOURCE, execute_copy_plan
from megarl.weights.planner import ParameterLayout, assign_buckets, plan_rank
from megarl.weights.stream import double_buffered

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-ffn", type=int, default=640)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2, help="TP = ETP size the shards are split by")
    parser.add_argument("--param-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--stream-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path (the median is reported)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the shards and buckets live")
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


def synthetic_config(args) -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_ffn,
        num_experts=args.experts,
        num_experts_per_tok=8,
        tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
    )


def hf_shape(name: str, config) -> tuple[int, ...]:
    """The HF checkpoint shape of a Qwen3-MoE tensor, from its module's name."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention, groups = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "embed_tokens": (config.vocab_size, hidden),
        "lm_head": (config.vocab_size, hidden),
        "norm": (hidden,),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "q_norm": (head_dim,),
        "k_norm": (head_dim,),
        "q_proj": (attention, hidden),
        "k_proj": (groups, hidden),
        "v_proj": (groups, hidden),
        "o_proj": (hidden, attention),
        "gate": (config.num_experts, hidden),
        "gate_proj": (config.moe_intermediate_size, hidden),
        "up_proj": (config.moe_intermediate_size, hidden),
        "down_proj": (hidden, config.moe_intermediate_size),
    }
    return shapes[name.rsplit(".", 2)[-2]]


def synthetic_layouts(config, tp: int, dtype: torch.dtype) -> list[ParameterLayout]:
    """The family's rules with every expert filled in, each with its TP shard's shape."""
    layouts = []
    for template in family_of(config).weight_rules(config):
        experts = range(config.num_experts) if template.is_expert else [None]
        for expert in experts:
            rule = template.instantiate(expert=expert) if template.is_expert else template
            shapes = {name: hf_shape(name, config) for name in rule.hf}
            size = tp if rule.parallel else 1
            if isinstance(rule, VocabParallel):
                full = padded_vocab_size(config.vocab_size, tp)
            elif rule.parallel:
                full = sum(shape[rule.dim] for shape in shapes.values())
            else:
                full = shapes[rule.hf[0]][rule.dim]
            shard_shape = list(shapes[rule.hf[0]])
            shard_shape[rule.dim] = full // size
            layout = ParameterLayout(rule=rule, shard_shape=tuple(shard_shape), dtype=dtype, num_shards=size)
            if dict(layout.hf_shapes()) != shapes:
                raise AssertionError(f"{rule.megatron}: shard {shard_shape} does not rebuild {shapes}")
            layouts.append(layout)
    return layouts


def allocate_shards(
    layouts: list[ParameterLayout], device: torch.device
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
    """Every shard as a view of one flat random buffer, as Megatron's parameter buffer holds them."""
    total = sum(layout.shard_numel * layout.num_shards for layout in layouts)
    dtype = layouts[0].dtype
    flat = torch.empty(total, dtype=dtype, device=device)
    if dtype.itemsize == 2:
        # Finite values from random bit patterns below the exponent's all-ones (cheaper than
        # normal_ on a billion elements).
        flat.view(torch.int16).random_(-16000, 16000)
    else:
        flat.uniform_(-1, 1)
    shards, offset = {}, 0
    for index, layout in enumerate(layouts):
        for shard in range(layout.num_shards):
            shards[(index, shard)] = flat[offset : offset + layout.shard_numel].view(layout.shard_shape)
            offset += layout.shard_numel
    return flat, shards


def torch_bucket(layouts, indices, metas, shards, out: torch.Tensor, dtype: torch.dtype) -> None:
    """Peers' per-tensor path for one bucket: cat, view, split, cast, copy."""
    by_name = {meta.name: meta for meta in metas}
    for index in indices:
        layout = layouts[index]
        rule = layout.rule
        pieces = [shards[(index, shard)] for shard in range(layout.num_shards)]
        full = torch.cat(pieces, dim=rule.dim) if len(pieces) > 1 else pieces[0]
        if isinstance(rule, FusedQKV):
            q_rows = rule.heads_per_group * rule.head_dim
            grouped = full.view(rule.num_query_groups, q_rows + 2 * rule.head_dim, *full.shape[1:])
            q, k, v = grouped.split([q_rows, rule.head_dim, rule.head_dim], dim=1)
            tensors = [q.reshape(-1, *full.shape[1:]), k.reshape(-1, *full.shape[1:]), v.reshape(-1, *full.shape[1:])]
        elif isinstance(rule, FusedGateUp):
            halves = full.view(layout.num_shards, 2, -1, *full.shape[1:])
            tensors = [halves[:, 0].reshape(-1, *full.shape[1:]), halves[:, 1].reshape(-1, *full.shape[1:])]
        elif isinstance(rule, VocabParallel):
            tensors = [full[: rule.vocab_size]]
        else:
            tensors = [full]
        for name, tensor in zip(rule.hf, tensors):
            meta = by_name[name]
            out[meta.start : meta.end].copy_(tensor.to(dtype).contiguous().view(-1).view(torch.uint8))


def shard_by_shard(plan, keys) -> torch.Tensor:
    """``plan``'s rows, those reading TP shard 0 first, then shard 1, ... (else in order)."""
    shard_of_source = [0] + [keys[index][1] for index in plan.local_tensors]
    rows = plan.plan.tolist()
    order = sorted(range(len(rows)), key=lambda row: (shard_of_source[rows[row][SOURCE]], row))
    return plan.plan[order].contiguous()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.ops.megarl.built_with_cuda():
        raise SystemExit("bench_weight_sync: megarl._C has no CUDA kernels; rebuild it on this machine with nvcc on PATH")
    param_dtype, stream_dtype = DTYPES[args.param_dtype], DTYPES[args.stream_dtype]
    config = synthetic_config(args)
    layouts = synthetic_layouts(config, args.tp, param_dtype)
    flat, shards = allocate_shards(layouts, device)
    keys = list(shards)
    tensors = [shards[key] for key in keys]
    bucket_bytes = int(args.bucket_mb * 2**20)

    start = time.perf_counter()
    plans = plan_rank(
        layouts, {key: 0 for key in keys}, {key: i for i, key in enumerate(keys)},
        rank=0, dst=0, dtype=stream_dtype, bucket_bytes=bucket_bytes,
    )
    first_planning = time.perf_counter() - start
    buckets = assign_buckets(layouts, stream_dtype, bucket_bytes)
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    buffers = [torch.zeros(max(plan.nbytes for plan in plans), dtype=torch.uint8, device=device) for _ in range(2)]

    def sources_per_bucket() -> list[list[torch.Tensor]]:
        # All a later step still plans: the cached plans' source lists (the stream keeps them).
        return [[empty, *(tensors[i] for i in plan.local_tensors)] for plan in plans]

    start = time.perf_counter()
    sources_per_bucket()
    later_planning = time.perf_counter() - start

    def engine_step():
        for index, (plan, sources) in enumerate(zip(plans, sources_per_bucket())):
            execute_copy_plan(plan.plan, sources, buffers[index % 2])

    separate_plans = [shard_by_shard(plan, keys) for plan in plans]

    def separate_step():
        for index, (plan, sources) in enumerate(zip(separate_plans, sources_per_bucket())):
            execute_copy_plan(plan, sources, buffers[index % 2])

    def torch_step():
        for index, (indices, metas) in enumerate(buckets):
            torch_bucket(layouts, indices, metas, shards, buffers[index % 2], stream_dtype)

    flat_bytes = flat.view(-1).view(torch.uint8)

    def copy_step():
        offset = 0
        for index, plan in enumerate(plans):
            buffers[index % 2][: plan.nbytes].copy_(flat_bytes[offset : offset + plan.nbytes])
            offset += plan.nbytes

    def memmove_step():
        offset = 0
        for index, plan in enumerate(plans):
            ctypes.memmove(buffers[index % 2].data_ptr(), flat_bytes.data_ptr() + offset, plan.nbytes)
            offset += plan.nbytes

    # The engine and the per-tensor path agree byte for byte (and the buffers are touched once).
    check = torch.zeros_like(buffers[0])
    for index, (plan, sources) in enumerate(zip(plans, sources_per_bucket())):
        execute_copy_plan(plan.plan, sources, buffers[0])
        torch_bucket(layouts, *buckets[index], shards, check, stream_dtype)
        if not torch.equal(buffers[0][: plan.nbytes], check[: plan.nbytes]):
            raise AssertionError(f"bucket {index}: the engine and the torch path differ")
    del check

    steps = {
        "copy_": copy_step, "memmove": memmove_step, "engine": engine_step, "separate": separate_step,
        "torch": torch_step,
    }
    if device.type == "cuda":
        del steps["memmove"]  # host memory only
        for step in steps.values():
            timed(step, 1, device)  # warm-up: kernel loads, the allocator's first blocks
    results = {name: [] for name in steps}
    for _ in range(args.repeats):
        # Interleaved, so that the machine's load drifts over all paths alike.
        for name, step in steps.items():
            results[name] += timed(step, 1, device)
    medians = {name: statistics.median(times) for name, times in results.items()}
    floor_path = min(("copy_", "memmove"), key=lambda name: medians.get(name, float("inf")))
    floor = medians[floor_path]
    total_bytes = sum(plan.nbytes for plan in plans)

    overlap = measure_overlap(plans, sources_per_bucket(), buffers, medians["engine"] / len(plans), device)

    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {
            "layers": args.layers, "experts": args.experts, "hidden": args.hidden, "moe_ffn": args.moe_ffn,
            "parameters": sum(layout.shard_numel * layout.num_shards for layout in layouts),
            "megatron_parameters": len(layouts), "shards": len(keys),
            "hf_tensors": sum(len(metas) for _, metas in buckets),
            "tp": args.tp, "param_dtype": args.param_dtype, "stream_dtype": args.stream_dtype,
        },
        "buckets": {"count": len(plans), "bucket_mb": args.bucket_mb, "bytes": total_bytes,
                    "copies": sum(plan.plan.shape[0] for plan in plans)},
        "seconds": {name: {"median": medians[name], "all": times} for name, times in results.items()},
        "gb_per_s": {name: total_bytes / medians[name] / 1e9 for name in medians},
        "floor": floor_path,
        "engine_over_floor": medians["engine"] / floor,
        "torch_over_engine": medians["torch"] / medians["engine"],
        "planning_seconds": {"first_step": first_planning, "later_steps": later_planning},
        "double_buffering": overlap,
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def measure_overlap(plans, sources, buffers, fill_seconds: float, device: torch.device) -> dict:
    """Steps with a consumer that holds each bucket as long as filling one takes, once one after
    the other and once through the stream's double buffering (fill k+1 while the consumer holds k).
    The consumer sleeps, as when the engine loads the bucket on another device or process."""

    def fill(index: int, out: torch.Tensor) -> Bucket:
        execute_copy_plan(plans[index].plan, sources[index], out)
        synchronize(device)  # the bucket is full before the consumer takes it
        return Bucket(buffer=out[: plans[index].nbytes], metas=list(plans[index].metas))

    def serial():
        for index in range(len(plans)):
            fill(index, buffers[index % 2])
            time.sleep(fill_seconds)

    def pipelined():
        for _ in double_buffered(fill, len(plans), buffers):
            time.sleep(fill_seconds)

    serial_seconds = statistics.median(timed(serial, 3, device))
    pipelined_seconds = statistics.median(timed(pipelined, 3, device))
    return {
        "consumer_seconds_per_bucket": fill_seconds,
        "serial": serial_seconds,
        "double_buffered": pipelined_seconds,
        "ideal": (len(plans) + 1) * fill_seconds,
    }


def print_table(report: dict) -> None:
    model, buckets = report["model"], report["buckets"]
    print(
        f"synthetic Qwen3-MoE: {model['layers']} layers x {model['experts']} experts, hidden {model['hidden']}, "
        f"{model['parameters'] / 1e9:.2f} B parameters; TP{model['tp']} shards ({model['shards']}), "
        f"{model['param_dtype']} -> {model['stream_dtype']}"
    )
    print(
        f"{model['hf_tensors']} HF tensors in {buckets['count']} buckets of <= {buckets['bucket_mb']:g} MiB "
        f"({buckets['bytes'] / 2**30:.2f} GiB, {buckets['copies']} copies); "
        f"{report['machine']['torch_threads']} threads, device {report['machine']['device']}"
    )
    floor = report["seconds"][report["floor"]]["median"]
    print(f"{'path':<8} {'median s':>9} {'GB/s':>7} {'vs floor':>9}")
    for name, seconds in report["seconds"].items():
        print(f"{name:<8} {seconds['median']:>9.3f} {report['gb_per_s'][name]:>7.2f} {seconds['median'] / floor:>8.2f}x")
    print(
        f"engine / floor ({report['floor']}): {report['engine_over_floor']:.2f}x   "
        f"torch / engine: {report['torch_over_engine']:.2f}x"
    )
    planning = report["planning_seconds"]
    print(f"planning: first step {planning['first_step']:.3f} s, later steps {planning['later_steps'] * 1e3:.2f} ms")
    overlap = report["double_buffering"]
    print(
        f"double buffering (consumer {overlap['consumer_seconds_per_bucket'] * 1e3:.0f} ms per bucket): "
        f"serial {overlap['serial']:.3f} s, double-buffered {overlap['double_buffered']:.3f} s, "
        f"ideal {overlap['ideal']:.3f} s"
    )


if __name__ == "__main__":
    main()
