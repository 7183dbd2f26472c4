"""Copy-engine bandwidth: one ``execute_copy_plan`` call against torch's ``Tensor.copy_`` of the same bytes.

Each case copies about ``--mib`` MiB of output, on the CPU (the C++ engine on torch's intra-op
threads) or on a GPU (the CUDA kernel):

- ``aligned``: one bf16 copy, source and output 16-byte aligned;
- ``misaligned2``: the same, its source 2 bytes past a 16-byte boundary (a bf16 tensor after an
  odd-sized one in a bucket without padding); ``copy_`` moves the same uint8 ranges;
- ``fp32->bf16``: one converting copy; ``copy_`` converts the same fp32 tensor into bf16;
- ``small``: ``--small-count`` bf16 tensors of odd sizes (1 - 8 KiB) packed back to back as in a
  bucket, one plan row each; ``copy_`` is one copy of all their bytes (the floor), and
  ``per-tensor copy_`` one ``copy_`` per tensor (what a plain per-tensor path pays).

GB/s counts the bytes read and written. Each figure is the median of ``--repeats`` timed runs
after one warm-up run; a GPU run synchronises after each. ``ratio`` is the engine's rate over
``copy_``'s: the goal of issue 24 is >= 0.9 in every case on a GPU.

    python tools/bench_copy.py [--device cpu|cuda] [--mib 256] [--repeats 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from megarl.weights.copy_plan import dtype_code, execute_copy_plan

CASES = ("aligned", "misaligned2", "fp32->bf16", "small")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mib", type=float, default=256, help="output MiB per case")
    parser.add_argument("--small-count", type=int, default=20000, help="tensors in the small case (fewer if --mib runs out)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (the median is reported)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU (default: torch's)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, repeats: int, device: torch.device) -> float:
    step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(source: int, source_offset: int, out_offset: int, length: int, source_dtype, out_dtype) -> list[int]:
    """One contiguous plan row (copy_plan's columns)."""
    return [source, source_offset, 0, out_offset, 0, 1, length, dtype_code(source_dtype), dtype_code(out_dtype)]


def small_sizes(count: int, out_bytes: int, generator: torch.Generator) -> list[int]:
    """Odd bf16 element counts of 1 - 8 KiB tensors, ``count`` of them or as many as fit."""
    sizes = torch.randint(512, 4096, (count,), generator=generator) | 1
    kept = sizes[torch.cumsum(sizes * 2, 0) <= out_bytes]
    return kept.tolist() or [max(1, out_bytes // 2 - 1) | 1]


def build_case(name: str, out_bytes: int, small_count: int, device: torch.device) -> dict:
    """The plan, sources and output of a case, and the ``copy_`` calls that move the same bytes."""
    generator = torch.Generator().manual_seed(0)
    bf16, fp32 = torch.bfloat16, torch.float32
    elements = out_bytes // 2
    out = torch.empty(out_bytes + 64, dtype=torch.uint8, device=device)
    if name in ("aligned", "misaligned2"):
        offset = 0 if name == "aligned" else 2
        source = torch.randn(elements + 16, generator=generator).to(bf16).to(device).view(torch.uint8)
        plan = torch.tensor([row(0, offset, 0, elements, bf16, bf16)], dtype=torch.int64)
        floor = {"copy": lambda: out[: elements * 2].copy_(source[offset : offset + elements * 2])}
        return {"plan": plan, "sources": [source], "out": out, "bytes": 4 * elements, "floors": floor}
    if name == "fp32->bf16":
        source = torch.randn(elements, generator=generator).to(device)
        plan = torch.tensor([row(0, 0, 0, elements, fp32, bf16)], dtype=torch.int64)
        target = out[: elements * 2].view(bf16)
        return {"plan": plan, "sources": [source], "out": out, "bytes": 6 * elements,
                "floors": {"copy": lambda: target.copy_(source)}}
    sizes = small_sizes(small_count, out_bytes, generator)
    total = sum(sizes)
    source = torch.randn(total, generator=generator).to(bf16).to(device)
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    plan = torch.tensor([row(0, 2 * start, 2 * start, size, bf16, bf16) for start, size in zip(starts, sizes)], dtype=torch.int64)
    flat_out, flat_source = out[: 2 * total], source.view(torch.uint8)
    views = [(flat_out[2 * start : 2 * (start + size)], flat_source[2 * start : 2 * (start + size)]) for start, size in zip(starts, sizes)]

    def per_tensor():
        for target, piece in views:
            target.copy_(piece)

    floors = {"copy": lambda: flat_out.copy_(flat_source), "per_tensor_copy": per_tensor}
    return {"plan": plan, "sources": [source], "out": out, "bytes": 4 * total, "floors": floors, "tensors": len(sizes)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/bench_copy.py: --device cuda but torch sees no CUDA device")
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"tools/bench_copy.py: unknown --cases {unknown}; choose from {', '.join(CASES)}")
    out_bytes = int(args.mib * 2**20) // 16 * 16
    results = []
    for name in cases:
        case = build_case(name, out_bytes, args.small_count, device)
        plan, sources, out = case["plan"], case["sources"], case["out"]
        seconds = median_seconds(lambda: execute_copy_plan(plan, sources, out), args.repeats, device)
        entry = {"case": name, "bytes": case["bytes"], "copies": plan.shape[0], "engine_seconds": seconds,
                 "engine_gbps": case["bytes"] / seconds / 1e9}
        for key, floor in case["floors"].items():
            floor_seconds = median_seconds(floor, args.repeats, device)
            entry[f"{key}_seconds"] = floor_seconds
            entry[f"{key}_gbps"] = case["bytes"] / floor_seconds / 1e9
        entry["ratio"] = entry["engine_gbps"] / entry["copy_gbps"]
        results.append(entry)
        del case
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    report = {
        "machine": {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform()},
        "settings": {"mib": args.mib, "repeats": args.repeats, "small_count": args.small_count},
        "results": results,
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def print_table(report: dict) -> None:
    print(f"copy engine vs copy_ on {report['machine']['device']} (GB/s read + written, median of {report['settings']['repeats']})")
    print("| case | copies | MiB moved | engine GB/s | copy_ GB/s | engine / copy_ | per-tensor copy_ GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for entry in report["results"]:
        per_tensor = entry.get("per_tensor_copy_gbps")
        print(
            f"| {entry['case']} | {entry['copies']} | {entry['bytes'] / 2**20:.1f} | {entry['engine_gbps']:.2f} | "
            f"{entry['copy_gbps']:.2f} | {entry['ratio']:.2f} | {'—' if per_tensor is None else f'{per_tensor:.2f}'} |"
        )


if __name__ == "__main__":
    main()
