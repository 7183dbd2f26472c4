"""``checkpoint.load_contents``: the config's rules and the preflight's (the loading itself:
tests/test_checkpoint.py, the ``ep2-to-pp2-weights`` case, a weights-only load)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megarl.checkpoint import load_checkpoint
from megarl.resume import resume_choice
from megarl.config import CheckpointConfig, FieldError, load_config
from megarl.preflight import _resume_problems

pytestmark = pytest.mark.cpu


def committed_checkpoint(root, step: int):
    """A committed checkpoint directory whose files the preflight's checks read as whole."""
    path = root / f"step_{step:08d}"
    dcp.save({"weight": torch.zeros(2)}, checkpoint_id=str(path / "weights"), no_dist=True)
    (path / "train_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    return path


def test_weights_only_needs_the_checkpoint_named():
    assert CheckpointConfig().load_contents == "all"
    for resume in ("auto", "never"):
        with pytest.raises(FieldError) as error:
            CheckpointConfig(load_contents="model", resume=resume)
        assert str(error.value) == (
            f"`checkpoint.load_contents` (model) starts a new run from a checkpoint's weights, so `checkpoint.resume` ({resume}) must name "
            "that checkpoint: set checkpoint.resume=<path>/step_NNNNNNNN (with auto a restart would start over from the same weights)"
        )
    assert CheckpointConfig(load_contents="model", resume="/runs/sft/checkpoints/step_00000100").load_contents == "model"


def test_weights_only_from_the_runs_own_directory_is_refused(tmp_path):
    """A new run's first save (step k) would set its own directory's later checkpoints aside, the
    one it started from among them."""
    own = committed_checkpoint(tmp_path / "runs" / "rl" / "checkpoints", 100)
    other = committed_checkpoint(tmp_path / "runs" / "sft" / "checkpoints", 100)
    run = [f"logging.run_dir={tmp_path}/runs/{{name}}", "logging.name=rl", "checkpoint.load_contents=model"]
    assert _resume_problems(load_config(None, [*run, f"checkpoint.resume={other}"])) == []
    assert _resume_problems(load_config(None, [*run, f"checkpoint.resume={own}", "checkpoint.load_contents=all"])) == []
    (problem,) = _resume_problems(load_config(None, [*run, f"checkpoint.resume={own}"]))
    assert problem.startswith(
        "`checkpoint.load_contents` (model) starts a new run at step 0, whose first save would set step_00000100 aside in the same directory"
    )


def test_an_unknown_content_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match=r"contents \('optimizer'\) must be 'all' or 'model'"):
        load_checkpoint(tmp_path, [], contents="optimizer")


def test_a_checkpoint_saved_with_the_routers_frozen_resumes_only_frozen_or_as_weights(tmp_path):
    """A frozen router has no optimizer state, so a full resume must keep model.freeze_moe_router
    as the checkpoint was saved with; its weights alone (load_contents model) load either way."""
    frozen = committed_checkpoint(tmp_path / "frozen", 7)
    state = json.loads((frozen / "train_state.json").read_text())
    (frozen / "train_state.json").write_text(json.dumps({**state, "freeze_moe_router": True}))
    trained = committed_checkpoint(tmp_path / "trained", 7)  # saved before the flag was recorded: not frozen
    run = [f"logging.run_dir={tmp_path}/runs/{{name}}", "model.path=bundled:tiny-moe"]
    assert _resume_problems(load_config(None, [*run, f"checkpoint.resume={frozen}", "model.freeze_moe_router=true"])) == []
    assert _resume_problems(load_config(None, [*run, f"checkpoint.resume={trained}"])) == []
    assert _resume_problems(load_config(None, [*run, f"checkpoint.resume={frozen}", "checkpoint.load_contents=model"])) == []
    (problem,) = _resume_problems(load_config(None, [*run, f"checkpoint.resume={frozen}"]))
    assert problem == (
        f"checkpoint {frozen} was saved with `model.freeze_moe_router` true, so its optimizer state lacks the routers': set "
        f"model.freeze_moe_router=true to resume it, or checkpoint.load_contents=model (with checkpoint.resume={frozen}) to start a "
        "new run from its weights"
    )
    (problem,) = _resume_problems(load_config(None, [*run, f"checkpoint.resume={trained}", "model.freeze_moe_router=true"]))
    assert "saved with `model.freeze_moe_router` false, so its optimizer state has the routers'" in problem


def test_a_run_started_from_weights_restarts_from_its_own_checkpoint(tmp_path):
    """The same command after the new run saved: its own newest checkpoint, whole, not the source's
    weights at step 0 again; a source in the run's own directory is left for the preflight to refuse."""
    source = committed_checkpoint(tmp_path / "runs" / "sft" / "checkpoints", 100)
    own = tmp_path / "runs" / "rl" / "checkpoints"
    assert resume_choice(str(source), "model", own) == (str(source), "model")
    assert resume_choice(str(source), "all", own) == (str(source), "all")
    saved = committed_checkpoint(own, 3)
    assert resume_choice(str(source), "model", own) == ("auto", "all")
    assert resume_choice(str(saved), "model", own) == (str(saved), "model")
    run = [f"logging.run_dir={tmp_path}/runs/{{name}}", "logging.name=rl", "checkpoint.load_contents=model", f"checkpoint.resume={source}"]
    assert _resume_problems(load_config(None, run)) == []
    (saved / "train_state.json").write_text(json.dumps({"step": 3, "world_size": 1, "freeze_moe_router": True}))
    # The restart loads the run's own checkpoint whole: its settings are checked, not the source's.
    (problem,) = _resume_problems(load_config(None, run))
    assert problem.startswith(f"checkpoint {saved} was saved with `model.freeze_moe_router` true")
