"""Distributed checkpoints: reshard on load, atomic commit, keep-last, resume modes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megarl.config import resolve_model_path
from megarl.trainer.checkpoint import CheckpointError, committed_checkpoints, resolve_resume
from tests.distributed import REPO, run_torchrun

WORKER = REPO / "tests" / "workers" / "checkpoint_check.py"


def run(root, mode, export, *extra):
    model = str(resolve_model_path("bundled:tiny-moe"))
    args = ["--model", model, "--root", str(root), "--mode", mode, "--export", str(export), *extra]
    return run_torchrun(WORKER, args, nproc=2)


def load_export(path):
    return torch.load(path), json.loads((path.parent / (path.name + ".json")).read_text())


def assert_bitwise_equal(first: dict, second: dict):
    assert first.keys() == second.keys()
    unequal = [name for name in first if not torch.equal(first[name], second[name])]
    assert unequal == []


@pytest.mark.multirank
@pytest.mark.parametrize(
    "save_layout,load_layout,load_optimizer",
    [
        (["--tp", "2", "--sp"], ["--pp", "2"], True),
        (["--ep", "2"], ["--pp", "2"], False),
    ],
    ids=["tp2-sp-to-pp2-with-optimizer", "ep2-to-pp2-weights"],
)
def test_save_under_one_layout_load_under_another(tmp_path, save_layout, load_layout, load_optimizer):
    root = tmp_path / "checkpoints"
    run(root, "save", tmp_path / "saved.pt", *save_layout)
    extra = [] if load_optimizer else ["--model-only"]
    run(root, "load", tmp_path / "loaded.pt", *load_layout, *extra)
    saved, _ = load_export(tmp_path / "saved.pt")
    loaded, state = load_export(tmp_path / "loaded.pt")
    assert_bitwise_equal(saved, loaded)
    assert state["step"] == 1 and state["consumed_prompts"] == 32
    if load_optimizer:
        # The scheduler resumed after one warm-up step: lr = 1e-3 + (1e-2 - 1e-3) / 2.
        assert state["lr"] == pytest.approx(5.5e-3)
        # Adam resumes after one step, each parameter with its own step count.
        assert set(state["adam_steps"]) == {1.0}
        assert state["adam_step_tensors_distinct"]


@pytest.mark.multirank
def test_killed_save_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    run(root, "save", tmp_path / "step1.pt", "--ep", "2", "--step", "1")
    with pytest.raises(AssertionError, match="exit code"):
        run(root, "save", tmp_path / "step2.pt", "--ep", "2", "--step", "2", "--crash-after-weights")
    assert [path.name for path in committed_checkpoints(root)] == ["step_00000001"]
    assert any(path.name.startswith(".tmp-") for path in root.iterdir())
    run(root, "load", tmp_path / "resumed.pt", "--ep", "2", "--resume", "auto")
    step1, _ = load_export(tmp_path / "step1.pt")
    resumed, state = load_export(tmp_path / "resumed.pt")
    assert state["path"].endswith("step_00000001")
    assert_bitwise_equal(step1, resumed)


@pytest.mark.multirank
def test_keep_last_deletes_only_after_commit(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        run(root, "save", tmp_path / f"step{step}.pt", "--ep", "2", "--step", str(step))
    # keep_last=2 in the worker.
    assert [path.name for path in committed_checkpoints(root)] == ["step_00000002", "step_00000003"]


@pytest.mark.cpu
def test_resume_modes(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None
    assert resolve_resume("never", root) is None
    for name in ("step_00000004", "step_00000012", ".tmp-step_00000020"):
        (root / name / "weights").mkdir(parents=True)
    assert resolve_resume("auto", root).name == "step_00000012"
    assert resolve_resume(str(root / "step_00000004"), root).name == "step_00000004"
    with pytest.raises(CheckpointError, match="not a committed megarl checkpoint"):
        resolve_resume(str(root / ".tmp-step_00000020"), root)


@pytest.mark.cpu
def test_convert_tools_help():
    for tool in ("convert_to_hf.py", "convert_from_hf.py"):
        result = subprocess.run(
            [sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "--out" in result.stdout
