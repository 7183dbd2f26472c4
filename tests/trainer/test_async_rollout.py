"""``rollout.mode: async`` end to end (two processes on gloo, the hf engine): partial rollouts whose
segments match the trainer under their own weight versions, the staleness bound under a slow
engine and a slow trainer, an engine killed while rounds are in flight, and a crash + resume that
trains every prompt of the epoch exactly once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed import REPO, run_torchrun

pytestmark = pytest.mark.multirank

WORKER = REPO / "tests" / "workers" / "train_check.py"
PROMPTS = 24
"""One epoch: 6 steps of 4 prompts x 4 samples."""
ASYNC = [
    "model.path=bundled:tiny-moe",
    "data.max_prompt_length=32",
    "data.max_response_length=4",
    "data.val_files=[]",
    "rollout.engine=hf",
    "rollout.engine_threads=1",
    "rollout.mode=async",
    "rollout.colocate=false",
    "rollout.max_staleness=1",
    "rollout.batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "algorithm.use_decoupled_loss=true",
    "train.global_batch_size=16",
    "train.mini_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.lr_warmup_steps=0",
    "train.optimizer.lr=1e-3",
    "train.steps=6",
    "checkpoint.save_every=2",
    "logging.console=false",
]
SEGMENT_TOLERANCE = 1e-5
"""fp32: the engine's log-probs and the trainer's differ by rounding only, segment by segment."""


def one_epoch_of_prompts(path: Path) -> Path:
    """The first :data:`PROMPTS` distinct prompts of the bundled toy task."""
    rows, seen = [], set()
    for line in (REPO / "megarl" / "assets" / "data" / "toy" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == PROMPTS:
            break
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def launch(tmp_path: Path, name: str, run_dir: Path, overrides: list[str], hooks: list[str]) -> tuple[dict, list[dict]]:
    report = tmp_path / f"{name}.json"
    run_torchrun(WORKER, ["--report", str(report), *hooks, *ASYNC, f"logging.run_dir={run_dir}", *overrides], nproc=2, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads(report.read_text()), rows


def test_async_run_partial_rollouts_staleness_a_killed_engine_and_a_resume_that_trains_each_prompt_once(tmp_path):
    data = one_epoch_of_prompts(tmp_path / "epoch.jsonl")
    run_dir = tmp_path / "run"
    # A slow engine (0.25 s a token, a round takes longer than a step), so every weight update
    # finds a round in flight: it is aborted and sent again under the new weights. The engine is
    # killed after step 0, with the next rounds in flight; the run stops before step 3, after the
    # checkpoint of step 1.
    first, first_rows = launch(
        tmp_path, "first", run_dir, [f"data.train_files=[{data}]", "rollout.hf_step_delay_s=0.25"],
        ["--check-segments", "--kill-engine-after", "0", "--stop-before", "3"],
    )
    assert not first["completed"] and first["engine_restarts"] == 1
    assert [row["step"] for row in first_rows] == [0, 1, 2]
    # Partial samples were trained, and each of their segments has the log-probs the trainer
    # computes under the weights of its version.
    segments = first["segments"]
    assert len(segments) >= 2, segments
    assert all(entry["tokens"] > 0 and entry["max_diff"] <= SEGMENT_TOLERANCE for entry in segments.values()), segments

    # Resumed with a slow trainer (1 s a step): generation runs ahead as far as the bound allows.
    second, rows = launch(tmp_path, "second", run_dir, [f"data.train_files=[{data}]"], ["--slow-step-s", "1"])
    assert second["completed"] and [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    for row in first_rows + rows:
        assert row["rollout/staleness_max"] <= 1 and row["rollout/dropped_stale"] == 0, row
        assert row["mismatch/behav_imp_weight_mean"] > 0
    assert any(row.get("rollout/staleness_1", 0) > 0 for row in rows[2:]), "the producer never ran ahead of the trainer"

    # Steps 0 and 1 from the first segment (its checkpoint), 2 to 5 from the resumed one: every
    # prompt of the epoch once.
    trained = [prompt for step in ("0", "1") for prompt in first["trained"][step]]
    trained += [prompt for step in ("2", "3", "4", "5") for prompt in second["trained"][step]]
    counts = Counter(tuple(prompt) for prompt in trained)
    assert counts == Counter(tuple(prompt) for prompt in second["prompts"]["ids"]), counts
