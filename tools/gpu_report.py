"""One table of what a ``tools/gpu_check.sh`` run left in its output folder, and all of it as JSON.

Reads, from ``OUT_DIR``:

- ``summary.txt``: each step's verdict and seconds (``build: passed in 95 s``, ``failed (exit 1)``,
  ``timed out``, ``skipped (...)``), the machine lines above them and the ``total``; a step without
  a line did not run (``GPU_CHECK_STEPS``);
- ``gpu_check.log``: the pytest summary (``12 passed, 1 skipped``) of each test step, from its section;
- ``bench_kernels.json`` (``tools/bench_kernels.py``): per op, pass and megarl provider at the
  largest shape measured, the achieved rate (GB/s or TFLOP/s), its share of the measured floor,
  and how many times faster than the torch path and Liger (their time over this one's); with
  ``--phases``, a row per provider with each forward+backward phase's time and rate (stats,
  grad-logits, dW, dX) and the pass's total rate;
- ``bench_weight_sync.json`` (``tools/bench_weight_sync.py``): the copy engine's GB/s, its share
  of the memcpy floor, how many times faster than the torch path;
- ``bench_copy.json`` (``tools/bench_copy.py``): per case, the copy engine's GB/s against ``copy_``'s
  of the same bytes (the issue's goal: >= 0.9 of it in every case);
- ``bench_update.json`` (``tools/bench_update.py``): tokens/s of the update and of the log-prob
  pass per micro-batch plan, each against the padded plan;
- ``train_moe/metrics.jsonl`` (the train-moe run, ``megarl/metrics.py``): steps logged, median
  ``time/step_s``, last ``reward/mean``.

Prints one markdown table (step, verdict, seconds, measure, result; a step with several numbers
takes several rows), ready to paste into docs/benchmarks.md, and writes ``OUT_DIR/gpu_check.json``:
the steps with their rows, the machine lines, and every tool's whole JSON (``null`` where missing).
A missing or unreadable file gives "—" cells, and its reason in the JSON's ``errors``; the report
itself fails only on an ``OUT_DIR`` that is not a folder (exit 2).

    python tools/gpu_report.py gpu_check        # after bash tools/gpu_check.sh (which runs it last)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

STEPS = ("build", "gpu-tests", "bench-kernels", "bench-weight-sync", "bench-copy", "bench-update", "kernel-tests", "train-moe")
"""tools/gpu_check.sh's steps, in its order."""

OUTPUTS = {
    "bench-kernels": "bench_kernels.json",
    "bench-weight-sync": "bench_weight_sync.json",
    "bench-copy": "bench_copy.json",
    "bench-update": "bench_update.json",
    "train-moe": "train_moe/metrics.jsonl",
}
"""What a step writes into the output folder (the paths tools/gpu_check.sh gives it)."""

TEST_STEPS = ("gpu-tests", "kernel-tests")
"""Steps whose result is a pytest run."""

MISSING = "—"
"""A cell with nothing to show: the step did not run, failed before writing, or wrote garbage."""

STEP_LINE = re.compile(r"^(?P<step>[a-z-]+): (?P<verdict>passed|timed out|failed \(exit \d+\)) in (?P<seconds>\d+) s$")
SKIPPED_LINE = re.compile(r"^(?P<step>[a-z-]+): (?P<verdict>skipped) \(.*\)$")
TOTAL_LINE = re.compile(r"^total: (?P<seconds>\d+) s$")
PYTEST_COUNTS = re.compile(r"(\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed)(?:, \d+ \w+)*) in [\d.]+s")
MEGARL_PROVIDERS = ("megarl", "megarl-tp1")


# ----------------------------------------------------------------------------------------------
# Reading what the steps left
# ----------------------------------------------------------------------------------------------


def read_summary(path: Path) -> tuple[dict[str, dict], list[str], int | None]:
    """``({step: {"verdict", "seconds"}}, machine lines, total seconds)`` from ``summary.txt``
    (empty, [], None when it is missing)."""
    if not path.is_file():
        return {}, [], None
    steps, machine, total = {}, [], None
    for line in path.read_text(errors="replace").splitlines():
        if match := STEP_LINE.match(line):
            steps[match["step"]] = {"verdict": match["verdict"], "seconds": int(match["seconds"])}
        elif match := SKIPPED_LINE.match(line):
            steps[match["step"]] = {"verdict": "skipped", "seconds": None}
        elif match := TOTAL_LINE.match(line):
            total = int(match["seconds"])
        elif line.strip() and not steps:
            machine.append(line.strip())
    return steps, machine, total


def pytest_counts(log: Path, step: str) -> str | None:
    """The last pytest summary (``12 passed, 1 skipped``) in ``step``'s section of ``gpu_check.log``."""
    if not log.is_file():
        return None
    # Sections start with the script's "===== STEP (limit ...)" (the report's: "===== report:").
    section = re.search(
        rf"^===== {re.escape(step)} \(limit .*?(?=^===== [a-z-]+(?: \(limit |: )|\Z)", log.read_text(errors="replace"), re.M | re.S
    )
    counts = PYTEST_COUNTS.findall(section.group(0)) if section else []
    return counts[-1] if counts else None


def read_json(path: Path):
    """The JSON a step wrote. Raises OSError or ValueError (``json.JSONDecodeError``) when it is
    missing or cut short."""
    return json.loads(path.read_text())


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The train-moe run's ``metrics.jsonl`` rows, read by megarl's own reader (imported here:
    without a built megarl there is no run to read either)."""
    from megarl.metrics import read_rows

    return read_rows(path)


# ----------------------------------------------------------------------------------------------
# Headline rows: (measure, result) per step
# ----------------------------------------------------------------------------------------------


def ratio(other: dict | None, result: dict) -> float | None:
    """How many times faster ``result`` ran than ``other`` (their times' ratio), None without both."""
    if other is None or "time_ms" not in other or "time_ms" not in result:
        return None
    return other["time_ms"] / result["time_ms"]


def kernel_rows(report: dict) -> list[tuple[str, str]]:
    """Per op, pass and megarl provider at the op's largest shape: rate, share of the floor,
    speed against the torch path and Liger."""
    rows = []
    for op in dict.fromkeys(result["op"] for result in report["results"]):
        entries = [result for result in report["results"] if result["op"] == op]
        largest = max(entries, key=lambda result: result["n"] * result["hidden"] * result["vocab"])
        shape = (largest["n"], largest["hidden"], largest["vocab"])
        at_shape = {
            (result["provider"], result["pass"]): result for result in entries
            if (result["n"], result["hidden"], result["vocab"]) == shape
        }
        shape_text = f"N,H,V {shape[0]},{shape[1]},{shape[2]}" if op != "logprob_entropy" else f"N,V {shape[0]},{shape[2]}"
        for (provider, pass_name), result in at_shape.items():
            if provider not in MEGARL_PROVIDERS:
                continue
            measure = f"{op} {pass_name}, {provider}, {shape_text}"
            if "error" in result:
                rows.append((measure, result["error"]))
                continue
            parts = [f"{result['achieved']:.3g} {result['achieved_unit']}", f"{100 * result['fraction_of_floor']:.1f} % of floor"]
            for other in ("torch", "liger"):
                if (other_result := at_shape.get((other, pass_name))) is not None:
                    times = ratio(other_result, result)
                    parts.append(f"{times:.2f}x vs {other}" if times is not None else f"{other}: {other_result.get('error', MISSING)}")
            rows.append((measure, ", ".join(parts)))
            if result.get("phases") and pass_name == "forward+backward":
                rows.append((f"{op} {pass_name} phases, {provider}, {shape_text}", phase_text(result)))
    return rows


def phase_text(result: dict) -> str:
    """``stats 1.2 ms 512 TFLOP/s; ...; total 581 TFLOP/s``: a pass's phases (``--phases``)."""
    parts = [
        f"{name} {entry['time_ms']:.3g} ms {entry['achieved']:.3g} {entry['achieved_unit']}"
        for name, entry in result["phases"].items()
    ]
    return "; ".join([*parts, f"total {result['achieved']:.3g} {result['achieved_unit']}"])


def weight_sync_rows(report: dict) -> list[tuple[str, str]]:
    """The copy engine's rate against the memcpy floor and the torch path."""
    buckets, floor = report["buckets"], report["floor"]
    measure = f"copy engine, {buckets['bytes'] / 2**30:.2f} GiB in {buckets['count']} buckets, {report['machine']['device']}"
    result = (
        f"{report['gb_per_s']['engine']:.1f} GB/s, {100 / report['engine_over_floor']:.1f} % of the {floor} floor "
        f"({report['gb_per_s'][floor]:.1f} GB/s), {report['torch_over_engine']:.2f}x vs torch"
    )
    return [(measure, result)]


def copy_rows(report: dict) -> list[tuple[str, str]]:
    """Per case, the copy engine's rate against ``copy_`` of the same bytes."""
    device = report["machine"]["device"]
    return [
        (
            f"copy engine, {entry['case']}, {entry['bytes'] / 2**20:.0f} MiB in {entry['copies']} copies, {device}",
            f"{entry['engine_gbps']:.1f} GB/s, {entry['ratio']:.2f}x copy_ ({entry['copy_gbps']:.1f} GB/s)",
        )
        for entry in report["results"]
    ]


def update_rows(report: dict) -> list[tuple[str, str]]:
    """Tokens/s of the update and the log-prob pass per plan, against the padded plan."""
    rows = report["rows"]
    base = next((row for row in rows if row["case"] == "padded"), rows[0])
    lines = []
    for key, name in (("update_s", "update"), ("log_prob_s", "log-prob pass")):
        base_seconds = statistics.median(base[key])
        parts = []
        for row in rows:
            seconds = statistics.median(row[key])
            against = "" if row is base else f" ({base_seconds / seconds:.2f}x)"
            parts.append(f"{row['case']} {row['real_tokens'] / seconds:,.0f}{against}")
        lines.append((f"{name} tokens/s, x vs {base['case']}", "; ".join(parts)))
    return lines


def train_rows(rows: list[dict[str, float]]) -> list[tuple[str, str]]:
    """Steps logged, the median step's seconds, the last reward."""
    step_seconds = [row["time/step_s"] for row in rows if "time/step_s" in row]
    rewards = [row["reward/mean"] for row in rows if "reward/mean" in row]
    parts = [f"{len(rows)} steps"]
    parts.append(f"median step {statistics.median(step_seconds):.2f} s" if step_seconds else f"median step {MISSING}")
    parts.append(f"last reward {rewards[-1]:.3f}" if rewards else f"last reward {MISSING}")
    return [("metrics.jsonl", ", ".join(parts))]


HEADLINES = {
    "bench-kernels": (read_json, kernel_rows),
    "bench-weight-sync": (read_json, weight_sync_rows),
    "bench-copy": (read_json, copy_rows),
    "bench-update": (read_json, update_rows),
    "train-moe": (read_metrics, train_rows),
}
"""Per step with an output: how to read it and the rows it gives."""


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def build_report(out_dir: Path) -> dict:
    """Everything the report shows, as the JSON it writes: ``machine`` (lines),
    ``total_seconds``, ``steps`` (each ``step``, ``verdict``, ``seconds``, ``rows`` of
    ``[measure, result]``), ``outputs`` (each tool's whole JSON, or the metrics rows; ``null``
    where missing) and ``errors`` (step -> why its output could not be read)."""
    summary, machine, total = read_summary(out_dir / "summary.txt")
    steps, outputs, errors = [], {}, {}
    for name in [*STEPS, *(step for step in summary if step not in STEPS)]:
        ran = summary.get(name, {"verdict": "not run", "seconds": None})
        rows = []
        if name in TEST_STEPS:
            rows.append(("pytest", pytest_counts(out_dir / "gpu_check.log", name) or MISSING))
        if name in HEADLINES:
            read, headline = HEADLINES[name]
            path = out_dir / OUTPUTS[name]
            outputs[name] = None
            if not path.exists():
                errors[name] = f"{OUTPUTS[name]}: missing"
            else:
                try:
                    outputs[name] = read(path)
                    rows.extend(headline(outputs[name]))
                except Exception as error:  # a file cut short by a killed step, or another format: a dash
                    outputs[name] = None
                    errors[name] = f"{OUTPUTS[name]}: {type(error).__name__}: {error}"
            if not rows:
                rows.append((OUTPUTS[name], MISSING))
        steps.append({**ran, "step": name, "rows": [list(row) for row in rows] or [["", ""]]})
    return {"out_dir": str(out_dir), "machine": machine, "total_seconds": total, "steps": steps, "outputs": outputs, "errors": errors}


def cell(value) -> str:
    """A markdown table cell: ``—`` for nothing, ``|`` escaped."""
    return MISSING if value is None or value == "" else str(value).replace("|", "\\|")


def markdown_table(report: dict) -> str:
    """One row per (step, measure); a step's verdict and seconds on its first row."""
    rows = [("step", "verdict", "s", "measure", "result"), ("---", "---", "---:", "---", "---")]
    for step in report["steps"]:
        for index, (measure, result) in enumerate(step["rows"]):
            head = (step["step"], step["verdict"], cell(step["seconds"])) if index == 0 else ("", "", "")
            rows.append((*head, measure.replace("|", "\\|"), cell(result)))
    if report["total_seconds"] is not None:
        rows.append(("total", "", str(report["total_seconds"]), "", ""))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="the output folder of tools/gpu_check.sh (its OUT)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"tools/gpu_report.py: {args.out_dir} is not a folder: give the OUT folder of tools/gpu_check.sh "
              "(default gpu_check)", file=sys.stderr)
        return 2
    report = build_report(args.out_dir)
    print(markdown_table(report))
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nall of it: {args.out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
