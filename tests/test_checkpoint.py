"""Distributed checkpoints: reshard on load, atomic commit, keep-last, resume modes (the saves and
loads run in processes shared with other tests: tests/jobs.py)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.config import resolve_model_path
from megarl.resume import CheckpointError, check_files, committed_checkpoints, resolve_resume
from tests.distributed import REPO
from tests.jobs import LAYOUTS, Job, JobFailed

MODEL = str(resolve_model_path("bundled:tiny-moe"))


def checkpoint_job(name: str, layout: str, mode: str, **options) -> Job:
    """Save (``mode="save"``) or load a checkpoint of the bundled tiny MoE under ``layout``
    (tests/workers/checkpoint_check.py)."""
    return Job(name=name, kind="checkpoint", model=MODEL, checks={mode: options}, nproc=2, layout=LAYOUTS[layout])


def assert_bitwise_equal(first: dict, second: dict):
    assert first.keys() == second.keys()
    unequal = [name for name in first if not torch.equal(first[name], second[name])]
    assert unequal == []


def across_layouts_jobs(directory, save_layout, load_layout, load_optimizer):
    case = directory / f"{save_layout}-to-{load_layout}"
    return [
        checkpoint_job(f"{case} save", save_layout, "save", root=str(case / "checkpoints"), export=str(case / "saved.pt")),
        checkpoint_job(
            f"{case} load", load_layout, "load", root=str(case / "checkpoints"), export=str(case / "loaded.pt"),
            model_only=not load_optimizer,
        ),
    ]


@pytest.mark.multirank
@pytest.mark.jobs(planner=across_layouts_jobs)
@pytest.mark.parametrize(
    "save_layout,load_layout,load_optimizer",
    [("tp2-sp", "pp2", True), ("ep2", "pp2", False)],
    ids=["tp2-sp-to-pp2-with-optimizer", "ep2-to-pp2-weights"],
)
def test_save_under_one_layout_load_under_another(jobs, save_layout, load_layout, load_optimizer):
    save, load = across_layouts_jobs(jobs.directory, save_layout, load_layout, load_optimizer)
    jobs.report(save.name)
    state = jobs.report(load.name)["load"]
    assert_bitwise_equal(torch.load(save.checks["save"]["export"]), torch.load(load.checks["load"]["export"]))
    assert state["step"] == 1 and state["consumed_prompts"] == 32
    if load_optimizer:
        # The scheduler resumed after one warm-up step: lr = 1e-3 + (1e-2 - 1e-3) / 2.
        assert state["lr"] == pytest.approx(5.5e-3)
        # Adam resumes after one step, each parameter with its own step count.
        assert set(state["adam_steps"]) == {1.0}
        assert state["adam_step_tensors_distinct"]
        assert not state["rng_kept"]  # same world size: each rank's RNG restored
    else:
        # checkpoint.load_contents=model: the same weights, but the schedule at its start (init_lr),
        # Adam without state and the RNG untouched, as a new run has them.
        assert state["lr"] == pytest.approx(1e-3) and state["adam_steps"] == [] and state["rng_kept"]


def killed_save_jobs(directory):
    case = directory / "killed-save"
    return [checkpoint_job(f"{case} step 1", "ep2", "save", root=str(case / "checkpoints"), export=str(case / "step1.pt"), step=1)]


@pytest.mark.multirank
@pytest.mark.jobs(planner=killed_save_jobs)
def test_killed_save_leaves_previous_checkpoint(jobs):
    (step1,) = killed_save_jobs(jobs.directory)
    jobs.report(step1.name)
    root = Path(step1.checks["save"]["root"])
    case = root.parent
    crashing = checkpoint_job(f"{case} step 2", "ep2", "save", root=str(root), export=str(case / "step2.pt"), step=2, crash_after_weights=True)
    jobs.run([crashing])
    with pytest.raises(JobFailed, match="exit code"):
        jobs.report(crashing.name)
    assert [path.name for path in committed_checkpoints(root)] == ["step_00000001"]
    assert any(path.name.startswith(".tmp-") for path in root.iterdir())
    resumed = checkpoint_job(f"{case} resumed", "ep2", "load", root=str(root), export=str(case / "resumed.pt"), resume="auto")
    jobs.run([resumed])
    state = jobs.report(resumed.name)["load"]
    assert state["path"].endswith("step_00000001")
    assert_bitwise_equal(torch.load(case / "step1.pt"), torch.load(case / "resumed.pt"))


def saves_jobs(case, steps):
    """EP2 saves of ``steps``, in that order, into ``case/checkpoints`` (keep_last=2 in the worker)."""
    return [
        checkpoint_job(f"{case} step {step}", "ep2", "save", root=str(case / "checkpoints"), export=str(case / f"step{step}-{index}.pt"), step=step)
        for index, step in enumerate(steps)
    ]


def keep_last_jobs(directory):
    return saves_jobs(directory / "keep-last", (1, 2, 3))


@pytest.mark.multirank
@pytest.mark.jobs(planner=keep_last_jobs)
def test_keep_last_deletes_only_after_commit(jobs):
    saves = keep_last_jobs(jobs.directory)
    for save in saves:
        jobs.report(save.name)
    # keep_last=2 in the worker.
    root = Path(saves[0].checks["save"]["root"])
    assert [path.name for path in committed_checkpoints(root)] == ["step_00000002", "step_00000003"]


def superseded_jobs(directory):
    return saves_jobs(directory / "superseded", (2, 3, 1))


@pytest.mark.multirank
@pytest.mark.jobs(planner=superseded_jobs)
def test_a_run_that_saves_an_earlier_step_sets_the_later_checkpoints_aside(jobs):
    # Steps 2 and 3 of a run, then a run started over saves step 1: resume=auto must take step 1,
    # keep_last (2) must not count the old run's, and nothing of it is deleted.
    saves = superseded_jobs(jobs.directory)
    for save in saves:
        jobs.report(save.name)
    root = Path(saves[0].checks["save"]["root"])
    assert committed_checkpoints(root) == [root / "step_00000001"] and resolve_resume("auto", root) == root / "step_00000001"
    aside = sorted(path.name.split(".")[0] for path in root.iterdir() if ".superseded-" in path.name)
    assert aside == ["step_00000002", "step_00000003"]


@pytest.mark.cpu
def test_resume_modes(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None
    assert resolve_resume("never", root) is None
    (root / ".tmp-step_00000020" / "weights").mkdir(parents=True)
    assert resolve_resume("auto", root) is None
    with pytest.raises(CheckpointError, match="not a committed megarl checkpoint"):
        resolve_resume(str(root / ".tmp-step_00000020"), root)


@pytest.mark.cpu
def test_convert_tools_help():
    for tool in ("convert_to_hf.py", "convert_from_hf.py"):
        result = subprocess.run(
            [sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "--out" in result.stdout


@pytest.mark.multirank
@pytest.mark.jobs(planner=keep_last_jobs)
@pytest.mark.parametrize(
    "damaged,expected",
    [
        ("weights/__0_1.distcp", r"weights/__0_1.distcp is truncated \(\d+ bytes of the \d+ its index needs\)"),
        ("weights/.metadata", r"weights/.metadata cannot be read"),
        ("weights/common.pt", r"weights/common.pt is not a whole torch file"),
        ("scheduler.pt", r"scheduler.pt is not a whole torch file"),
        ("train_state.json", r"train_state.json is not valid JSON"),
    ],
)
def test_a_damaged_file_is_named_before_anything_loads(jobs, tmp_path, damaged, expected):
    saves = keep_last_jobs(jobs.directory)
    jobs.report(saves[-1].name)
    committed = Path(saves[-1].checks["save"]["root"]) / "step_00000003"
    copy = tmp_path / committed.name
    shutil.copytree(committed, copy)
    check_files(copy)
    path = copy / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^checkpoint {copy} is damaged: {expected}"):
        check_files(copy)


@pytest.mark.multirank
@pytest.mark.jobs(planner=keep_last_jobs)
@pytest.mark.parametrize("damaged", ["weights/__0_0.distcp", "weights/.metadata", "rng/rank_1.pt", "scheduler.pt", "train_state.json", "hf/config.json"])
def test_a_damaged_latest_checkpoint_names_the_intact_one_and_auto_falls_back_to_it(jobs, tmp_path, caplog, damaged):
    saves = keep_last_jobs(jobs.directory)
    jobs.report(saves[-1].name)
    root = tmp_path / "checkpoints"
    shutil.copytree(saves[-1].checks["save"]["root"], root)
    older, latest = root / "step_00000002", root / "step_00000003"
    assert resolve_resume("auto", root) == latest and resolve_resume(str(older), root) == older
    path = latest / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as refused:
        resolve_resume(str(latest), root)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"checkpoint {latest} is damaged: {damaged} ")
    assert message.endswith(
        f"the newest intact checkpoint is {older}: resume from it with checkpoint.resume={older}, or start over with checkpoint.resume=never"
    )
    assert resolve_resume("auto", root, set_aside=False) == older and latest.is_dir() and not caplog.text
    with caplog.at_level(logging.WARNING, logger="megarl"):
        assert resolve_resume("auto", root) == older
    aside = root / "step_00000003.damaged"
    assert committed_checkpoints(root) == [older] and (aside / damaged).exists()
    assert f"{damaged} " in caplog.text and f"resuming from the newest intact checkpoint, {older}; the damaged one is kept as {aside}" in caplog.text
    broken = older / "train_state.json"
    broken.write_text(broken.read_text()[:10])
    with pytest.raises(CheckpointError, match=rf"no checkpoint under {root} is intact \(1 damaged\): start over with checkpoint.resume=never"):
        resolve_resume("auto", root)
