"""What a run shows when it ends: the summary line and the curves, and tools/plot_run.py over them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.report import duration, finish_run, summary_line
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

PLOT_RUN = REPO / "tools" / "plot_run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAUNCHED_AT = 1_000.0


def synthetic_rows(steps: int, *, start: int = 0, first_done: float = 16.0, validation_every: int | None = 25, kl: bool = True) -> list[dict]:
    """Rows as a run logs them: a step every 0.5 s (rollout 0.25, forward 0.05, update 0.15, sync
    0.05), the reward rising to 1 by step 40, validation every ``validation_every`` steps and at
    the last; the first row logged ``first_done`` s after :data:`LAUNCHED_AT`."""
    rows = []
    for step in range(start, start + steps):
        row = {
            "step": step, "time": LAUNCHED_AT + first_done + 0.5 * (step - start),
            "reward/mean": min(step / 40, 1.0), "response/length_mean": 4.0 - step / 100, "policy/entropy": 3.0 - step / 50,
            "mismatch/logprob_diff_abs_mean": 1e-7, "mismatch/rollout_kl": 0.0,
            "time/step_s": 0.5, "time/rollout_s": 0.25, "time/forward_s": 0.05, "time/update_s": 0.15, "weights/sync_s": 0.05,
        }
        if kl:
            row |= {"policy/approx_kl": 1e-3, "policy/kl_loss": 0.0}
        if validation_every and (step % validation_every == 0 or step == start + steps - 1):
            row["val/accuracy"] = min(step / 50, 0.9)
        rows.append(row)
    return rows


def write_run(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_summary_line_of_a_run():
    rows = synthetic_rows(200)
    line = summary_line(rows, launched_at=LAUNCHED_AT, picture=Path("runs/x/curves.png"))
    assert line == (
        "training done: 200 steps in 1 min 55 s from launch | step 0 logged at 16.0 s"
        " | median step 0.50 s (rollout 50%, forward 10%, update 30%, sync 10%)"
        " | reward 1.000 (mean of the last 20 steps) | val_acc 0.900 (step 199) | curves: runs/x/curves.png"
    )


def test_summary_line_of_a_resumed_run_counts_from_the_resume():
    # Steps 0-99 ran in an earlier launch; this one resumed at step 100 and its first step took 9 s.
    rows = synthetic_rows(100, first_done=-5000.0) + synthetic_rows(100, start=100, first_done=9.0, validation_every=None)
    rows[-1]["time/step_s"] = 0.6  # 0.1 s of the step in none of the phases
    line = summary_line(rows, launched_at=LAUNCHED_AT, start_step=100)
    assert line.startswith("training done: resumed at step 100, 100 steps in 58.5 s from launch | step 100 logged at 9.0 s | median step 0.50 s (")
    assert "other 0%" not in line and "val_acc" not in line and "curves" not in line
    # Shares of the summed step times (50.1 s): the 0.1 s outside the phases is under 1%.
    assert "(rollout 50%, forward 10%, update 30%, sync 10%)" in line
    few = summary_line(synthetic_rows(5, validation_every=None, kl=False), launched_at=LAUNCHED_AT)
    assert "reward 0.050 (mean of the last 5 steps)" in few


def test_duration_reads_as_a_person_says_it():
    assert [duration(seconds) for seconds in (7.25, 153.0, 3725.0)] == ["7.2 s", "2 min 33 s", "1 h 02 min"]


def test_a_finished_run_gets_its_curves_and_the_line_naming_them(tmp_path):
    run_dir = write_run(tmp_path / "run", synthetic_rows(30, validation_every=None, kl=False))
    line = finish_run(run_dir, launched_at=LAUNCHED_AT, start_step=0)
    picture = run_dir / "curves.png"
    assert line.endswith(f"| curves: {picture}") and picture.read_bytes().startswith(PNG_SIGNATURE)


def plot_run(*arguments, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PLOT_RUN), *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_plot_run_draws_a_run_into_its_directory(tmp_path):
    run_dir = write_run(tmp_path / "run", synthetic_rows(60))
    result = plot_run(run_dir)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"wrote {run_dir / 'curves.png'}\n", "")
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_run_compares_two_runs_one_without_validation_or_kl(tmp_path):
    full = write_run(tmp_path / "full", synthetic_rows(60))
    # Their curves are left out, the panels stay.
    bare = write_run(tmp_path / "bare", synthetic_rows(20, validation_every=None, kl=False))
    out = tmp_path / "compare" / "both.png"
    result = plot_run(full / "metrics.jsonl", bare, "-o", out)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"wrote {out}\n", "")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_run_refuses_a_bad_metrics_file_with_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n')
    for arguments, problem in [
        ([tmp_path / "missing"], f"{tmp_path / 'missing'}: cannot be read (No such file or directory)"),
        ([empty], f"{empty}: no rows (the run logged no step)"),
        ([tmp_path / "broken"], f"{broken / 'metrics.jsonl'}:2: not valid JSON"),
    ]:
        result = plot_run(*arguments, "-o", tmp_path / "never.png")
        assert result.returncode == 2 and result.stdout == "", result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"plot_run: {problem}"), line
    assert not (tmp_path / "never.png").exists()
