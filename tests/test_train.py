"""The training loop end to end on CPU: real processes on gloo, the embedded hf engine, the weight
stream, rewards in worker processes; with faults injected by tests/workers/train_check.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.distributed import REPO, free_port, launch, run_torchrun

WORKER = REPO / "tests" / "workers" / "train_check.py"
MISMATCH_TOLERANCE = 1e-5
"""fp32: the engine's log-probs and the trainer's differ by rounding only."""

SMALL = [
    "model.path=bundled:tiny-moe",
    "data.max_prompt_length=32",
    "data.max_response_length=4",
    "rollout.engine=hf",
    "rollout.batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=16",
    "train.mini_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.lr_warmup_steps=1",
    "train.optimizer.lr=1e-3",
    "logging.console=false",
]
"""A run small enough for a test: 16 samples of at most 4 tokens per step, 2 optimizer steps."""


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(tmp_path: Path, name: str, overrides: list[str], *, nproc: int = 2, hooks: list[str] = (), config: list[str] = ()) -> tuple[dict, list[dict]]:
    """Run the worker (on ``config``, e.g. ``["--config", FILE]``); return its report and the run's
    metrics.jsonl rows."""
    run_dir = tmp_path / name
    report = tmp_path / f"{name}.json"
    run_torchrun(
        WORKER, ["--report", str(report), *config, *hooks, *SMALL, f"logging.run_dir={run_dir}", *overrides], nproc=nproc, timeout=600
    )
    return json.loads(report.read_text()), metrics(run_dir)


def readme_command(run_dir: Path, overrides: list[str]):
    """The README's first command, as written there (``.venv/bin/torchrun --nproc_per_node 2 -m
    megarl.train --config configs/moe_grpo.yaml``, from the repository root) with ``overrides``; only
    the rendezvous port is a free one. Returns the run's metrics.jsonl rows."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [
        torchrun, "--nproc_per_node", "2", f"--master_port={free_port()}",
        "-m", "megarl.train", "--config", "configs/moe_grpo.yaml", *overrides, f"logging.run_dir={run_dir}",
    ]
    result = launch(command, {}, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}: exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    return metrics(run_dir)


def assert_finite(rows: list[dict], expected_nan: dict[int, set[str]] | None = None) -> None:
    """Every float metric is finite, but those ``expected_nan`` names per step, which are NaN."""
    expected_nan = expected_nan or {}
    for row in rows:
        bad = {name: value for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)}
        nan = expected_nan.get(row["step"], set())
        assert {name: value for name, value in bad.items() if name not in nan} == {}, f"step {row['step']}: non-finite metrics {bad}"
        assert all(math.isnan(row[name]) for name in nan), f"step {row['step']}: {sorted(nan)} should be NaN"


@pytest.mark.multirank
def test_expert_parallel_run_survives_a_killed_engine_a_failing_reward_and_a_nan_step(tmp_path):
    # One optimizer step per RL step, so the skipped step is the whole update; no warm-up, whose
    # first step has learning rate 0.
    report, rows = train(
        tmp_path,
        "ep2",
        [
            "parallel.expert=2", "train.steps=3", "train.eval_every=2", "reward.type=function",
            f"reward.function={REPO}/tests/workers/flaky_reward.py:reward",
            "train.mini_batch_size=16", "train.lr_warmup_steps=0",
        ],
        hooks=["--kill-engine-after", "0", "--nan-step", "1"],
    )
    assert report["completed"] and [row["step"] for row in rows] == [0, 1, 2]
    # The NaN in step 1's first micro-batch shows in its gradient norm, and nowhere else.
    assert_finite(rows, expected_nan={1: {"policy/grad_norm"}})
    # Validation at step 0, every 2 steps, and at the last step.
    assert ["val/accuracy" in row for row in rows] == [True, False, True]
    # The engine killed after step 0 was restarted, with the weights of step 0's update: step 1's
    # rollout log-probs still match the trainer's.
    assert report["engine_restarts"] == 1 and rows[1]["rollout/engine_restarts"] == 1
    for row in rows:
        assert row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE
    assert sum(row["reward/failures"] for row in rows) > 0
    # Step 1 was skipped and counted, and its weights are step 0's.
    assert [row["policy/skipped_steps"] for row in rows] == [0, 1, 0]
    weights = report["weights"]
    assert weights["after_0"] != weights["initial"] and weights["after_2"] != weights["after_1"]
    assert weights["after_1"] == weights["after_0"]
    assert (Path(report["run_dir"]) / "checkpoints" / "step_00000002" / "weights").is_dir()


@pytest.mark.multirank
def test_tensor_parallel_run_with_dynamic_sampling_trains_and_updates_the_engine(tmp_path):
    report, rows = train(
        tmp_path, "tp2",
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.steps=2", "algorithm.dynamic_sampling=true", "checkpoint.save_hf=true"],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    # Groups without signal were dropped and rolled out again (or topped up after 4 rounds).
    for row in rows:
        assert row["filter/groups_dropped_equal"] > 0 and 1 <= row["rollout/rounds"] <= 4
        assert row["filter/groups_kept"] * 4 + row.get("filter/topped_up_samples", 0) >= 16
    assert all(row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE for row in rows)
    assert report["weights"]["after_0"] != report["weights"]["initial"]
    assert report["weights"]["after_1"] != report["weights"]["after_0"]
    # checkpoint.save_hf: the final policy as a HF directory, the engine's weights exactly.
    exported = Path(report["run_dir"]) / "hf"
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {path.name for path in exported.iterdir()}
    with safe_open(exported / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.self_attn.o_proj.weight").tolist() == report["weights"]["after_1"]


RESUMED_METRICS = ("policy/loss", "policy/grad_norm", "policy/approx_kl", "policy/lr", "reward/mean", "mismatch/logprob_diff_abs_mean")


@pytest.mark.multirank
def test_the_readme_command_trains_from_the_repository_root_and_resumes_bitwise(tmp_path):
    """The README's first command, a few steps of it, is the uninterrupted run; the same run
    crashed before step 2 (the worker) and started again with the README's command (which resumes
    from the last checkpoint) must log the same metrics, bit for bit."""
    overrides = [
        *SMALL, "logging.console=true", "train.steps=4", "checkpoint.save_every=2",
    ]
    straight = readme_command(tmp_path / "straight", overrides)
    assert [row["step"] for row in straight] == [0, 1, 2, 3]
    assert_finite(straight)
    first, _ = train(tmp_path, "resumed", overrides, hooks=["--stop-before", "2"], config=["--config", str(REPO / "configs" / "moe_grpo.yaml")])
    assert not first["completed"]
    resumed = readme_command(tmp_path / "resumed", overrides)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3]
    for expected, got in zip(straight, resumed):
        for name in RESUMED_METRICS:
            assert got[name] == expected[name], f"step {expected['step']}: {name} {got[name]!r} != {expected[name]!r}"
    # The learning rate warmed up and decays: the schedule was restored, not restarted.
    assert resumed[3]["policy/lr"] < resumed[1]["policy/lr"]


@pytest.mark.multirank
def test_ppo_with_a_critic_and_token_budget_micro_batches_trains_both(tmp_path):
    # The run's length in epochs: 8 prompts, 16 samples / 4 per prompt = 4 prompts a step -> 2 steps.
    report, rows = train(
        tmp_path,
        "ppo",
        [
            "model.path=bundled:tiny-dense", "algorithm.advantage_estimator=gae", "algorithm.lam=0.95",
            "train.steps=null", "train.total_epochs=1", "data.max_samples=8",
            "critic.optimizer.lr=1e-3", "train.dynamic_batch=true", "train.max_tokens_per_micro_batch=64",
        ],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    for name in ("critic/loss", "critic/value_error", "critic/grad_norm", "policy/loss"):
        assert name in rows[0]
    assert rows[1]["critic/grad_norm"] > 0


@pytest.mark.cpu
def test_a_config_error_exits_with_the_field_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megarl.train", "--config", str(REPO / "configs" / "moe_grpo.yaml"), "train.mini_batch_sise=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "train.mini_batch_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.cpu
def test_a_bad_dataset_row_exits_with_the_file_and_line_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "max 1 2 3", "answer": "3"}\n{"prompt": "max 4 5 6", "answer": \n')
    result = subprocess.run(
        [sys.executable, "-m", "megarl.train", "--config", str(REPO / "configs" / "moe_grpo.yaml"), "parallel.expert=1",
         f"data.train_files=[{data}]", f"logging.run_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert f"{data}:2: not valid JSON" in result.stderr and "Traceback" not in result.stderr
