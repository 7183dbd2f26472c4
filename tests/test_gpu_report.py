"""tools/gpu_report.py: the one table of a tools/gpu_check.sh run, from the files the steps leave.

The benchmarks' JSON and the run's metrics.jsonl are made here by the tools' own code on tiny CPU
inputs (bench_kernels, bench_weight_sync, megarl's MetricsLogger), so the report reads the formats
they write; bench_update's rows (one process per case, Megatron in each: too slow for a test) and
the script's summary and log lines are written out as the tool and the script write them."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from megarl.config import LoggingConfig
from megarl.metrics import MetricsLogger
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

STEPS = ["build", "gpu-tests", "bench-kernels", "bench-weight-sync", "bench-copy", "bench-update", "kernel-tests", "train-moe"]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = load_tool("gpu_report")

SUMMARY = """date: 2026-12-05 09:00 UTC
NVIDIA H100 80GB HBM3, 81559 MiB, 580.1, 9.0
python 3.12.3 | torch 2.11.0+cu130 | triton 3.6.0 | cuda 13.0
cpus: 16
build: passed in 71 s
gpu-tests: failed (exit 1) in 22 s
bench-kernels: passed in 64 s
bench-weight-sync: passed in 18 s
bench-copy: passed in 12 s
bench-update: passed in 41 s
kernel-tests: timed out in 50 s
train-moe: passed in 47 s
total: 316 s
"""

LOG = """===== gpu-tests (limit 40 s): python3 -m pytest -q tests/weights/test_copy_plan_cuda.py
===== short test summary info =====
FAILED tests/weights/test_copy_plan_cuda.py::test_dtypes - AssertionError
1 failed, 30 passed, 2 skipped in 12.30s
===== kernel-tests (limit 50 s): python3 -m pytest -q tests/kernels/test_logprob_entropy.py
........
"""


def update_report() -> dict:
    """bench_update.py's JSON: ``{"lengths", "rows"}``, a row as its ``run_case`` returns it."""
    def row(case, micro_batches, model_tokens, update_s, log_prob_s):
        return {
            "case": case, "log_prob_s": log_prob_s, "update_s": update_s, "peak_bytes": 3 << 30,
            "micro_batches": micro_batches, "model_tokens": model_tokens, "real_tokens": 40000, "device": "NVIDIA H100 80GB HBM3",
        }

    return {"lengths": [[64, 300]] * 128, "rows": [
        row("padded", 12, 52000, [2.0, 2.2, 2.1], [0.5, 0.5, 0.6]),
        row("packed+balanced", 10, 40000, [1.0, 1.1, 1.05], [0.25, 0.25, 0.3]),
    ]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An OUT folder as a whole gpu_check run leaves it (on tiny CPU shapes)."""
    out = tmp_path_factory.mktemp("gpu_check")
    (out / "summary.txt").write_text(SUMMARY)
    (out / "gpu_check.log").write_text(LOG)
    load_tool("bench_kernels").main([
        "--device", "cpu", "--shapes", "64,32,128", "16,32,64", "--warmup", "0", "--iters", "1",
        "--providers", "megarl", "megarl-tp1", "torch", "liger", "--phases", "--json", str(out / "bench_kernels.json"),
    ])
    load_tool("bench_weight_sync").main([
        "--layers", "1", "--experts", "2", "--hidden", "64", "--moe-ffn", "32", "--heads", "2", "--kv-heads", "1",
        "--vocab", "128", "--repeats", "1", "--bucket-mb", "0.0625", "--json", str(out / "bench_weight_sync.json"),
    ])
    load_tool("bench_copy").main(["--device", "cpu", "--mib", "0.25", "--small-count", "16", "--repeats", "1", "--json", str(out / "bench_copy.json")])
    (out / "bench_update.json").write_text(json.dumps(update_report(), indent=1))
    logger = MetricsLogger(LoggingConfig(console=False), out / "train_moe", enabled=True)
    for step in range(20):
        logger.log(step, {"reward/mean": 0.25 + step / 100, "time/step_s": 1.0 + (step % 3) / 10, "time/rollout_s": 0.5})
    logger.close()
    return out


def test_the_table_shows_every_step_and_its_headline_numbers(full_run, capsys):
    assert gpu_report.main([str(full_run)]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert table[0] == "| step | verdict | s | measure | result |"
    cells = [[part.strip() for part in line.strip("|").split(" | ")] for line in table[2:]]
    assert [row[0] for row in cells if row[0]] == [*STEPS, "total"]
    by_step, current = {}, None
    for row in cells:
        current = row[0] or current
        by_step.setdefault(current, []).append(row)
    assert by_step["build"] == [["build", "passed", "71", "", "—"]]
    assert by_step["gpu-tests"] == [["gpu-tests", "failed (exit 1)", "22", "pytest", "1 failed, 30 passed, 2 skipped"]]
    assert by_step["kernel-tests"] == [["kernel-tests", "timed out", "50", "pytest", "—"]]

    # Kernels: both ops, both passes, both megarl providers, at the larger of the two shapes only;
    # after each forward+backward row, its phases (--phases).
    kernels = by_step["bench-kernels"]
    assert [row[1:3] for row in kernels] == [["passed", "64"]] + [["", ""]] * 11
    measures = [row[3] for row in kernels]
    assert measures == [
        measure
        for op, shape in (("logprob_entropy", "N,V 64,128"), ("fused_linear_logprob_entropy", "N,H,V 64,32,128"))
        for provider in ("megarl", "megarl-tp1")
        for measure in (f"{op} forward, {provider}, {shape}", f"{op} forward+backward, {provider}, {shape}",
                        f"{op} forward+backward phases, {provider}, {shape}")
    ]
    phases = [row for row in kernels if " phases, " in row[3]]
    kernels = [row for row in kernels if " phases, " not in row[3]]
    for row in phases:
        unit = "GB/s" if row[3].startswith("logprob") else "TFLOP/s"
        names = ["stats", "grad-logits"] if row[3].startswith("logprob") else ["stats", "grad-logits", "dW", "dX"]
        assert re.fullmatch(
            "; ".join([*(rf"{name} [\d.e+-]+ ms [\d.e+-]+ {unit}" for name in names), rf"total [\d.e+-]+ {unit}"]), row[4]
        ), row
    for row in kernels:
        unit = "GB/s" if row[3].startswith("logprob") else "TFLOP/s"
        assert re.fullmatch(rf"[\d.e+-]+ {unit}, [\d.]+ % of floor, [\d.]+x vs torch", row[4]), row

    (sync,) = by_step["bench-weight-sync"]
    assert sync[3].startswith("copy engine, 0.00 GiB in ") and sync[3].endswith(", cpu")
    assert re.fullmatch(r"[\d.]+ GB/s, [\d.]+ % of the (copy_|memmove) floor \([\d.]+ GB/s\), [\d.]+x vs torch", sync[4])

    copies = by_step["bench-copy"]
    assert [row[1:3] for row in copies] == [["passed", "12"]] + [["", ""]] * 3
    assert [row[3].split(",")[1].strip() for row in copies] == ["aligned", "misaligned2", "fp32->bf16", "small"]
    for row in copies:
        assert re.fullmatch(r"copy engine, [a-z0-9>-]+, \d+ MiB in \d+ copies, CPU \(.*\)", row[3]), row
        assert re.fullmatch(r"[\d.]+ GB/s, [\d.]+x copy_ \([\d.]+ GB/s\)", row[4]), row

    assert [row[3:] for row in by_step["bench-update"]] == [
        ["update tokens/s, x vs padded", "padded 19,048; packed+balanced 38,095 (2.00x)"],
        ["log-prob pass tokens/s, x vs padded", "padded 80,000; packed+balanced 160,000 (2.00x)"],
    ]
    assert by_step["train-moe"] == [["train-moe", "passed", "47", "metrics.jsonl", "20 steps, median step 1.10 s, last reward 0.440"]]
    assert by_step["total"] == [["total", "", "316", "", ""]]


def test_the_json_holds_everything(full_run):
    assert gpu_report.main([str(full_run)]) == 0
    report = json.loads((full_run / "gpu_check.json").read_text())
    assert report["machine"][1] == "NVIDIA H100 80GB HBM3, 81559 MiB, 580.1, 9.0" and report["total_seconds"] == 316
    assert [step["step"] for step in report["steps"]] == STEPS and report["errors"] == {}
    outputs = report["outputs"]
    assert outputs["bench-kernels"] == json.loads((full_run / "bench_kernels.json").read_text())
    assert outputs["bench-update"] == update_report()
    assert len(outputs["train-moe"]) == 20 and outputs["train-moe"][-1]["reward/mean"] == pytest.approx(0.44)
    providers = {result["provider"] for result in outputs["bench-kernels"]["results"]}
    assert providers == {"megarl", "megarl-tp1", "torch"}


def test_missing_and_broken_files_give_dashes_not_a_crash(tmp_path, capsys):
    # Killed in the middle of bench-kernels: its JSON cut short, nothing after it.
    (tmp_path / "summary.txt").write_text(
        "build: passed in 70 s\ngpu-tests: passed in 20 s\nbench-kernels: timed out in 80 s\n"
        "bench-weight-sync: skipped (the 480 s budget is spent)\ntotal: 475 s\n"
    )
    (tmp_path / "bench_kernels.json").write_text('{"device": "NVIDIA H100", "results": [')
    assert gpu_report.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert rows == [
        "| build | passed | 70 |  | — |",
        "| gpu-tests | passed | 20 | pytest | — |",
        "| bench-kernels | timed out | 80 | bench_kernels.json | — |",
        "| bench-weight-sync | skipped | — | bench_weight_sync.json | — |",
        "| bench-copy | not run | — | bench_copy.json | — |",
        "| bench-update | not run | — | bench_update.json | — |",
        "| kernel-tests | not run | — | pytest | — |",
        "| train-moe | not run | — | train_moe/metrics.jsonl | — |",
        "| total |  | 475 |  |  |",
    ]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"]["bench-kernels"].startswith("bench_kernels.json: JSONDecodeError")
    assert report["errors"]["train-moe"] == "train_moe/metrics.jsonl: missing"
    assert report["outputs"] == {"bench-kernels": None, "bench-weight-sync": None, "bench-copy": None, "bench-update": None, "train-moe": None}

    # An empty folder (the script stopped before its first step): every step "not run".
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_report.main([str(empty)]) == 0
    assert capsys.readouterr().out.count("| not run |") == len(STEPS)


def test_a_folder_that_is_not_there_is_refused(tmp_path, capsys):
    assert gpu_report.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_gpu_check_writes_what_the_report_reads():
    script = (REPO / "tools" / "gpu_check.sh").read_text()
    for output in gpu_report.OUTPUTS.values():
        assert f'"$OUT/{output.split("/")[0]}' in script, output
    assert "logging.run_dir=\"$OUT/train_moe\"" in script
    steps = re.findall(r"^step ([a-z-]+) \d+ ", script, re.M)
    assert tuple(steps) == gpu_report.STEPS
