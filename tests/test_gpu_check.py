"""tools/gpu_check.sh --dry-run: on a machine without a GPU it lists every step and checks each
command without running it (the tools parse their arguments, the tests are collected, the training
config validates), so the script is ready for the minutes a GPU is lent; a step whose command would
fail its arguments fails the dry run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.distributed import REPO

pytestmark = pytest.mark.cpu

STEPS = ["build", "gpu-tests", "bench-kernels", "bench-weight-sync", "bench-copy", "bench-update", "kernel-tests", "train-moe"]


def dry_run(script, out, steps=None):
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    if steps:
        environment["GPU_CHECK_STEPS"] = steps
    return subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=environment, timeout=300)


def test_the_dry_run_lists_and_checks_every_step(tmp_path):
    result = dry_run(REPO / "tools" / "gpu_check.sh", tmp_path)
    assert result.returncode == 0, result.stdout + (tmp_path / "gpu_check.log").read_text()[-3000:]
    lines = [line for line in result.stdout.splitlines() if " -- " in line]
    assert [line.split(" ", 1)[0] for line in lines] == [*STEPS, "report"]
    assert all(line.endswith("-- checked") for line in lines), lines
    # Nothing ran: no benchmark wrote its JSON, no training run its directory.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.log", "summary.txt"]


def test_a_step_whose_tool_refuses_its_arguments_fails_the_dry_run(tmp_path):
    # A copy of the repository whose script gives a benchmark an argument it does not take.
    copy = tmp_path / "repo"
    (copy / "tools").mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in ("tools", ".git", ".venv"):
            (copy / entry.name).symlink_to(entry)
    for tool in (REPO / "tools").iterdir():
        if tool.name != "gpu_check.sh":
            (copy / "tools" / tool.name).symlink_to(tool)
    script = (REPO / "tools" / "gpu_check.sh").read_text().replace("--layers 32", "--layer-count 32")
    (copy / "tools" / "gpu_check.sh").write_text(script)
    result = dry_run(copy / "tools" / "gpu_check.sh", tmp_path / "out", steps="bench-weight-sync bench-kernels")
    assert result.returncode == 1
    assert "bench-weight-sync (limit 45 s)" in result.stdout and "-- FAILED the check" in result.stdout
    assert "bench-kernels" in result.stdout and result.stdout.count("-- checked") == 1
    assert "unrecognized arguments: --layer-count" in (tmp_path / "out" / "gpu_check.log").read_text()
