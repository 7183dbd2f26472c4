"""The training loop end to end on CPU: real processes on gloo, the embedded hf engine, the weight
stream, rewards in worker processes; with faults injected by tests/workers/train_check.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megarl.resume import committed_checkpoints
from megarl.config import resolve_model_path

from tests.distributed import AGENT_PLAYERS, REPO, free_port, launch, run_torchrun

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


NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How metrics.jsonl writes values that are not finite (strict JSON has no NaN)."""


def strict_json(line: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl is not strict JSON: bare {constant} in {line[:200]}")

    row = json.loads(line, parse_constant=refuse)
    return {name: NON_FINITE.get(value, value) if isinstance(value, str) else value for name, value in row.items()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, checked to be strict JSON, non-finite values as floats."""
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    result = launch_readme_command(run_dir, overrides)
    assert result.returncode == 0, f"{' '.join(result.args)}: exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    return metrics(run_dir)


def launch_readme_command(run_dir: Path, overrides: list[str], **options) -> subprocess.CompletedProcess:
    """:func:`readme_command`'s launch, whatever its outcome (``options``: :func:`launch`'s)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [
        torchrun, "--nproc_per_node", "2", f"--master_port={free_port()}",
        "-m", "megarl.train", "--config", "configs/moe_grpo.yaml", *overrides, f"logging.run_dir={run_dir}",
    ]
    return launch(command, {}, timeout=600, **options)


TEACHER_MODES_TOLERANCE = 1e-4
"""The engine teacher's log-probs against the Megatron teacher's: rounding (fp32; 1e-5 is enough on CPU)."""
MEGATRON_TEACHER = ["algorithm.use_opd=true", "algorithm.opd_type=megatron", "teacher.path=bundled:tiny-teacher"]
SELF_TEACHER = ["algorithm.use_opd=true", "algorithm.opd_type=megatron", "teacher.path=bundled:tiny-moe"]
"""The policy's own model (``SMALL``'s) as its teacher, in Megatron."""
SELF_TEACHER_TOLERANCE = 1e-5
"""fp32: the same model's log-probs, in the policy and in the teacher, differ by rounding only."""


def check_distillation_metrics(rows: list[dict]) -> None:
    """Every step logged the distillation metrics of a teacher that is another model than the policy."""
    for row in rows:
        # The policy (tiny MoE) and the teacher (a dense model) are different models: a KL per token.
        assert row["opd/reverse_kl"] != 0 and row["opd/teacher_log_prob"] < 0 and row["time/teacher_s"] > 0


def check_teacher(report: dict, rows: list[dict]) -> None:
    """A run with ``algorithm.use_opd`` and ``bundled:tiny-teacher`` as the teacher logged the
    distillation metrics, kept its teacher engine's log, and that engine scored a sample as
    transformers does."""
    check_distillation_metrics(rows)
    assert (Path(report["run_dir"]) / "engines" / "teacher-0.log").is_file()
    # The teacher's log-probs are transformers' own of the sample, token by token, given the prompt.
    sample = report["teacher_sample"]
    sequence = sample["prompt_ids"] + sample["response_ids"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("bundled:tiny-teacher"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0, len(sample["prompt_ids"]) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(sample["response_ids"])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(sample["teacher_log_probs"]), expected, atol=1e-5, rtol=1e-5)


def assert_finite(rows: list[dict], expected_nan: dict[int, set[str]] | None = None) -> None:
    """Every float metric is finite, but those ``expected_nan`` names per step, which are NaN."""
    expected_nan = expected_nan or {}
    for row in rows:
        bad = {name: value for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)}
        nan = expected_nan.get(row["step"], set())
        assert {name: value for name, value in bad.items() if name not in nan} == {}, f"step {row['step']}: non-finite metrics {bad}"
        assert all(math.isnan(row[name]) for name in nan), f"step {row['step']}: {sorted(nan)} should be NaN"


VALIDATION_SOURCES = {"first": ["max 1 5 3", "max 7 2 4", "min 3 8 6", "max 2 9 1"], "plain": ["max 4 6 5", "min 9 8 7", "max 3 1 2", "max 5 5 6"]}
"""Two validation files: ``first.jsonl``'s rows name their data_source, ``plain.jsonl``'s do not
(its name is their source)."""


def validation_files(directory: Path) -> list[Path]:
    files = []
    for source, prompts in VALIDATION_SOURCES.items():
        answers = [str(max(map(int, prompt.split()[1:])) if prompt.startswith("max") else min(map(int, prompt.split()[1:]))) for prompt in prompts]
        rows = [{"prompt": prompt, "answer": answer, **({"data_source": source} if source == "first" else {})} for prompt, answer in zip(prompts, answers)]
        files.append(write_jsonl(directory / f"{source}.jsonl", rows))
    return files


def generation_files(directory: Path) -> dict[str, list[dict]]:
    """``<step>.jsonl`` -> its records (strict JSON), for every file of a generation directory."""
    return {path.name: [strict_json(line) for line in path.read_text().splitlines()] for path in sorted(directory.iterdir())}


def check_validation_metrics(row: dict, suffix: str = "") -> None:
    """Per-source and pass@k metrics of 4 + 4 prompts, 2 samples each, scores 0 or 1."""
    sources = [row[f"val/{source}/accuracy{suffix}"] for source in VALIDATION_SOURCES]
    assert row[f"val/accuracy{suffix}"] == pytest.approx(sum(sources) / 2)
    # Scores are 0 or 1 and correct means >= 1: pass@1 is the accuracy; pass@2 is at least that.
    assert row[f"val/pass@1{suffix}"] == pytest.approx(row[f"val/accuracy{suffix}"])
    assert row[f"val/pass@1{suffix}"] <= row[f"val/pass@2{suffix}"] <= 1
    assert all(f"val/{source}/pass@2{suffix}" in row for source in VALIDATION_SOURCES)


@pytest.mark.multirank
def test_expert_parallel_run_survives_a_killed_engine_a_failing_reward_and_a_nan_step(tmp_path):
    # One optimizer step per RL step, so the skipped step is the whole update; no warm-up, whose
    # first step has learning rate 0; an entropy bonus, so that every step that is not skipped
    # moves the weights even when all of its 16 samples score the same (zero advantages).
    # Validation of two sources, two samples a prompt; the generations saved.
    val_files = ",".join(str(path) for path in validation_files(tmp_path))
    overrides = [
        "parallel.expert=2", "train.steps=3", "train.eval_every=2", "train.val_before_train=true", "reward.type=function",
        f"reward.function={REPO}/tests/workers/flaky_reward.py:reward",
        "train.mini_batch_size=16", "train.lr_warmup_steps=0", "algorithm.entropy_coeff=0.01",
        f"data.val_files=[{val_files}]", "rollout.val_n_samples=2", "rollout.val_temperature=1.0",
        "logging.rollout_dir=generations", f"logging.validation_dir={tmp_path / 'validation'}",
        # The moe_distill layout, the teacher in Megatron: dense, beside the MoE under EP 2 (CI time).
        *MEGATRON_TEACHER,
    ]
    report, rows = train(tmp_path, "ep2", overrides, hooks=["--kill-engine-after", "0", "--nan-step", "1"])
    assert report["completed"] and [row["step"] for row in rows] == [0, 1, 2]
    # The NaN in step 1's first micro-batch shows in its gradient norm, and nowhere else.
    assert_finite(rows, expected_nan={1: {"policy/grad_norm"}})
    check_distillation_metrics(rows)
    assert not (Path(report["run_dir"]) / "engines" / "teacher-0.log").exists()  # no teacher engine
    # Validation after every 2 steps (after step 1) and after the last; before training too
    # (train.val_before_train), logged with step 0.
    assert ["val/accuracy" in row for row in rows] == [False, True, True]
    assert all(("time/validation_s" in row) == ("val/accuracy" in row) for row in rows)
    assert ["val/accuracy_before_train" in row for row in rows] == [True, False, False]
    assert 0 <= rows[0]["val/accuracy_before_train"] <= 1 and rows[0]["time/validation_before_train_s"] > 0
    check_validation_metrics(rows[0], "_before_train")
    for row in rows[1:]:
        check_validation_metrics(row)
    check_generations(Path(report["run_dir"]), tmp_path / "validation", rows)
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

    # train.val_only on the same run directory: the last checkpoint validated as the run did
    # after its last step (the same weights, prompts and seeds), logged as step 3, nothing trained.
    # Validation needs no teacher: the launch builds none (CI time).
    validated = generation_files(tmp_path / "validation")["2.jsonl"]
    report, rows = train(tmp_path, "ep2", [*[value for value in overrides if value not in MEGATRON_TEACHER], "train.val_only=true"])
    assert report["completed"] and report["weights"] == {"initial": weights["after_2"]}
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert {name: value for name, value in rows[3].items() if name.startswith("val/")} == {
        name: value for name, value in rows[2].items() if name.startswith("val/")
    }
    assert rows[3]["time/validation_s"] > 0 and "policy/loss" not in rows[3]
    assert generation_files(tmp_path / "validation")["2.jsonl"] == validated
    assert [path.name for path in committed_checkpoints(Path(report["run_dir"]) / "checkpoints")][-1] == "step_00000002"


def check_generations(run_dir: Path, validation_dir: Path, rows: list[dict]) -> None:
    """The generation files of the ep2 run: every trained sample of every step, every validation
    sample, their scores those the metrics summarise."""
    rollouts = generation_files(run_dir / "generations")
    assert list(rollouts) == ["0.jsonl", "1.jsonl", "2.jsonl"]
    for name, records in rollouts.items():
        assert len(records) == 16 and {record["step"] for record in records} == {int(name.split(".")[0])}
        assert {record["data_source"] for record in records} == {"train"}  # the bundled toy train.jsonl
        # GRPO's advantage plus the distillation term, read at the first response token (the
        # prompt's columns and the padding hold 0).
        assert all(math.isfinite(record["advantage"]) for record in records) and any(record["advantage"] != 0 for record in records)
        # The flaky reward's extra number, for the samples it scored (a failed one has none).
        assert all(record["reward_extras"] in ({}, {"characters": float(len(record["response"]))}) for record in records)
        assert any(record["reward_extras"] for record in records)
    validations = generation_files(validation_dir)
    assert list(validations) == ["-1.jsonl", "1.jsonl", "2.jsonl"]  # before training, after steps 1 and 2
    for (name, records), row, suffix in zip(validations.items(), rows, ["_before_train", "", ""]):
        assert [(record["index"], record["sample"]) for record in records] == [(index, sample) for index in range(8) for sample in range(2)]
        assert [record["data_source"] for record in records] == ["first"] * 8 + ["plain"] * 8
        assert sum(record["score"] for record in records) / 16 == pytest.approx(row[f"val/accuracy{suffix}"])


@pytest.mark.multirank
def test_tensor_parallel_run_with_dynamic_sampling_the_optimal_token_baseline_and_a_distillation_teacher_trains_and_updates_the_engine(tmp_path):
    # The optimal token baseline's sum of squared probabilities comes from the old-log-prob pass,
    # the vocabulary split over the two ranks; on-policy distillation rides along (CI time), from
    # the bundled teacher in Megatron, split over the two ranks too; the teacher's engine scores
    # the first step's samples as well.
    report, rows = train(
        tmp_path, "tp2",
        [
            "parallel.tensor=2", "parallel.sequence_parallel=true", "train.steps=2", "algorithm.dynamic_sampling=true", "checkpoint.save_hf=true",
            "algorithm.advantage_estimator=optimal_token_baseline", *MEGATRON_TEACHER,
        ],
        hooks=["--teacher-engine"],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    assert all(row["advantages/std"] > 0 for row in rows)
    check_teacher(report, rows)
    # Both teacher modes give the same log-probs: the engine's (transformers') and Megatron's.
    teacher = report["megatron_teacher"]
    assert teacher["tokens"] > 0 and teacher["engine_diff"] <= TEACHER_MODES_TOLERANCE and teacher["old_diff"] > 0.1, teacher
    # Groups without signal were dropped and rolled out again (or topped up after 4 rounds).
    for row in rows:
        assert row["filter/groups_dropped_equal"] > 0 and 1 <= row["rollout/rounds"] <= 4
        assert row["filter/groups_kept"] * 4 + row.get("filter/topped_up_samples", 0) >= 16
    # Synchronous training: every trained sample came from the weights the trainer last pushed.
    assert all(row["rollout/staleness_mean"] == row["rollout/staleness_max"] == 0 and row["rollout/staleness_0"] > 0 for row in rows)
    assert all(row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE for row in rows)
    assert report["weights"]["after_0"] != report["weights"]["initial"]
    assert report["weights"]["after_1"] != report["weights"]["after_0"]
    # checkpoint.save_hf: the final policy as a HF directory, the engine's weights exactly.
    exported = Path(report["run_dir"]) / "hf"
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {path.name for path in exported.iterdir()}
    with safe_open(exported / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.self_attn.o_proj.weight").tolist() == report["weights"]["after_1"]


@pytest.mark.multirank
def test_glm_run_streams_the_expert_bias_that_megatron_balances(tmp_path):
    # With model.moe_router_bias_update_rate the routers' expert bias moves by the rate per
    # optimizer step (2 per RL step here) towards equal load; the engine gets it with the weights
    # and routes as the trainer does.
    rate = 0.01
    report, rows = train(
        tmp_path, "glm",
        ["model.path=bundled:tiny-glm4-moe", "train.steps=2", f"model.moe_router_bias_update_rate={rate}", "algorithm.routing_replay=r2"],
        nproc=1, hooks=["--watch", "model.layers.1.mlp.gate.e_score_correction_bias"],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    assert all(row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE for row in rows)
    # R2 replays the old-log-prob pass's routing in the update; the routers are measured every step.
    assert all(row["moe/tokens_dropped"] == 0.0 and 0 < row["moe/router_entropy"] and "moe/routing_diff" not in row for row in rows)
    weights = report["weights"]
    for before, after in ((weights["initial"], weights["after_0"]), (weights["after_0"], weights["after_1"])):
        moves = [abs(new - old) for old, new in zip(before, after)]
        assert 0 < max(moves) <= 2 * rate + 1e-6, moves


@pytest.mark.multirank
def test_deepseek_v3_trains_under_expert_parallelism_and_updates_the_engine(tmp_path):
    # Dynamic sampling keeps only groups with a reward signal: every step has a gradient.
    report, rows = train(
        tmp_path, "deepseek-v3",
        ["model.path=bundled:tiny-deepseek-v3", "parallel.expert=2", "train.steps=2", "algorithm.dynamic_sampling=true", "algorithm.routing_replay=r3"],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    assert all(row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE for row in rows)
    # R3: the engine returned the experts of every sample and the trainer routed exactly so.
    assert all(row["moe/routing_diff"] == 0.0 and "moe/routing_diff_recomputed" in row for row in rows)
    # The multi-latent attention's output projection, as the engine holds it.
    assert report["weights"]["after_0"] != report["weights"]["initial"]
    assert report["weights"]["after_1"] != report["weights"]["after_0"]


@pytest.mark.multirank
@pytest.mark.parametrize("player", list(AGENT_PLAYERS.values()), ids=list(AGENT_PLAYERS))
def test_multi_turn_episodes_train_on_their_sampled_tokens_with_the_engines_log_probs(tmp_path, player):
    report, rows = train(
        tmp_path, "agent",
        [
            "train.steps=2", "train.eval_every=2", *player, "agent.max_turns=2", "agent.max_tokens_per_turn=4",
            "data.max_response_length=16", "data.train_files=[bundled:lookup/train.jsonl]",
            "data.val_files=[bundled:lookup/val.jsonl]", "data.val_max_samples=8", *SELF_TEACHER,
        ],
    )
    assert report["completed"] and len(rows) == 2
    assert_finite(rows)
    # On-policy distillation from the policy's own model, in Megatron, rides along (CI time): at
    # step 0 its log-probs of the model's tokens are the old log-probs, the reverse KL 0.
    teacher = report["megatron_teacher"]
    assert teacher["tokens"] > 0 and teacher["old_diff"] <= SELF_TEACHER_TOLERANCE, teacher
    assert abs(rows[0]["opd/reverse_kl"]) <= SELF_TEACHER_TOLERANCE and all(row["time/teacher_s"] > 0 for row in rows)
    # Episodes of two turns with a tool message between them: the trainer's log-probs of the model's
    # tokens, read in the whole sequence, equal the engine's, turn by turn.
    assert all(row["mismatch/logprob_diff_abs_max"] <= MISMATCH_TOLERANCE for row in rows)
    counts_tool_calls = player[0].startswith("agent.environment")
    assert any(
        row["agent/turns_mean"] > 1 and row["agent/observation_token_share"] > 0 and (not counts_tool_calls or row["env/tool_calls"] > 0)
        for row in rows
    )
    # The rows whose environment or program raised: their episodes failed and were counted; the
    # run went on; validation played episodes too.
    assert sum(row["agent/env_failures"] for row in rows) > 0 and all(row["agent/env_timeouts"] == 0 for row in rows)
    assert "val/accuracy" in rows[-1]


RESUMED_METRICS = ("policy/loss", "policy/grad_norm", "policy/approx_kl", "policy/lr", "reward/mean", "mismatch/logprob_diff_abs_mean")


VERL_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {
        "score": float(solution_str.strip()[:1] == str(ground_truth)) + 0.1 * len(solution_str.strip()),
        "from_second_file": float(data_source == "second"),
        "has_index": float(isinstance(extra_info, dict) and "index" in extra_info),
    }
"""
"""A reward file as verl users have it (verl's signature), copied unchanged."""


def verl_rows(source: str, tasks: list[tuple[str, str]], system: str | None = None) -> list[dict]:
    """Toy prompts as rows of a verl dataset: chat messages, ``data_source``, the answer under
    ``reward_model.ground_truth``, ``extra_info``."""
    rows = []
    for index, (question, answer) in enumerate(tasks):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        rows.append({"prompt": messages, "data_source": source, "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": index}})
    return rows


@pytest.mark.multirank
def test_ppo_from_the_bundled_config_on_verl_data_mixed_truncated_and_counted_in_epochs(tmp_path):
    # dense_ppo.yaml with its warm-up of 5 optimizer steps, in a run of 4: warmed up over all 4.
    first = write_jsonl(tmp_path / "first.jsonl", verl_rows("first", [("max 1 5 3", "5"), ("max 7 2 4", "7"), ("min 3 8 6", "3"), ("max 2 9 1", "9")]))
    long_system = "You answer with one digit and nothing else. " * 3
    second = write_jsonl(tmp_path / "second.jsonl", verl_rows("second", [(f"max {a} {b} {c}", str(max(a, b, c))) for a, b, c in [(1, 2, 3), (4, 6, 5), (9, 8, 7), (3, 1, 2), (5, 5, 6), (2, 7, 4)]], long_system))
    reward = tmp_path / "verl_reward.py"
    reward.write_text(VERL_REWARD)
    # 8 prompts (max_samples: the 4 of the first file, then the second's first 4), 16 samples of 4
    # per prompt a step: one epoch is 2 steps.
    report, rows = train(
        tmp_path,
        "ppo",
        [
            "train.lr_warmup_steps=5", "train.steps=null", "train.total_epochs=1", "data.max_samples=8",
            f"data.train_files=[{first}, {second}]", "data.train_file_weights=[1, 1]", "data.answer_key=reward_model.ground_truth",
            "data.filter_overlong_prompts=false", "data.truncation=left", "data.val_files=[]",
            "reward.type=function", f"reward.function={reward}:compute_score",
            "critic.optimizer.lr=1e-3", "train.dynamic_batch=true", "train.max_tokens_per_micro_batch=64",
        ],
        config=["--config", str(REPO / "configs" / "dense_ppo.yaml")],
    )
    assert report["completed"] and report["steps"] == 2 and len(rows) == 2
    assert_finite(rows)
    for name in ("critic/loss", "critic/value_error", "critic/grad_norm", "policy/loss"):
        assert name in rows[0]
    assert rows[1]["critic/grad_norm"] > 0
    prompts = report["prompts"]
    assert prompts["files"] == [0, 0, 0, 0, 1, 1, 1, 1] and prompts["truncated"] == 4 and max(prompts["lengths"]) == 32
    # verl's signature got the row's data_source and extra_info; both files were drawn from.
    assert all(row["reward/failures"] == 0 and row["reward/has_index"] == 1.0 for row in rows)
    assert 0 < sum(row["reward/from_second_file"] for row in rows) < 2


@pytest.mark.cpu
def test_a_config_error_exits_with_the_field_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megarl.train", "--config", str(REPO / "configs" / "moe_grpo.yaml"), "train.mini_batch_sise=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "train.mini_batch_size" in result.stderr and "Traceback" not in result.stderr


COMMAND_PROBE = """
import sys
from megarl.train import main
code = main(sys.argv[1:])
print(sorted(name for name in ("torch", "transformers", "megatron.core") if name in sys.modules))
sys.exit(code)
"""
"""``python -m megarl.train`` that also says which heavy libraries it imported."""


@pytest.mark.cpu
def test_bad_inputs_are_refused_before_torch_is_imported_and_megarl_config_says_the_same(tmp_path):
    good = tmp_path / "rewards.py"
    good.write_text("def reward(prompt, response, answer, **row):\n    return 1.0\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def reward(prompt, response, answer, **row):\n    return (1.0\n")
    cases = {
        "missing reward file": (["reward.type=function", f"reward.function={tmp_path}/nope.py:reward"], f"{tmp_path}/nope.py does not exist"),
        "misspelt function": (["reward.type=function", f"reward.function={good}:rewrad"], "has no function named 'rewrad' (it defines ['reward'])"),
        "syntax error": (["reward.type=function", f"reward.function={broken}:reward"], f"{broken}:2: syntax error"),
        "missing data file": ([f"data.train_files=[{tmp_path}/train.jsonl]"], f"data.train_files: {tmp_path}/train.jsonl does not exist"),
        # The registered names are checked last, with torch: not while a cheap check fails.
        "missing data file, unregistered policy loss": (
            [f"data.train_files=[{tmp_path}/train.jsonl]", "algorithm.policy_loss=ppoo"], f"data.train_files: {tmp_path}/train.jsonl does not exist"
        ),
        "wrong prompt key": (["data.prompt_key=question"], "train.jsonl:1: no field 'question' (data.prompt_key)", "val.jsonl:1: no field 'question'"),
    }
    environment = {**os.environ, "WORLD_SIZE": "2"}
    for case, (overrides, *expected) in cases.items():
        arguments = ["--config", "configs/moe_grpo.yaml", *overrides, f"logging.run_dir={tmp_path / 'run'}"]
        command = subprocess.run([sys.executable, "-c", COMMAND_PROBE, *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
        assert (command.returncode, command.stdout) == (2, "[]\n"), f"{case}: {command.stderr}"
        lines = command.stderr.splitlines()
        assert len(lines) == len(expected) and all(line.startswith("megarl.train: ") and part in line for line, part in zip(lines, expected)), case
        checked = subprocess.run([sys.executable, "-m", "megarl.config", *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
        assert (checked.returncode, checked.stderr.splitlines()) == (2, [line.replace("megarl.train:", "megarl.config:", 1) for line in lines]), case
    assert not (tmp_path / "run").exists()


@pytest.mark.cpu
def test_the_bundled_configs_accept_a_two_step_run_with_the_warm_up_clamped():
    for config in ("moe_grpo.yaml", "moe_grpo_async.yaml", "dense_ppo.yaml", "moe_agent.yaml"):
        result = subprocess.run(
            [sys.executable, "-m", "megarl.config", "--config", f"configs/{config}", "train.steps=2"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "valid for world size" in result.stdout, result.stderr
        assert "warming up over all" in result.stderr


@pytest.mark.multirank
def test_the_readme_command_trains_ctrl_c_names_the_last_checkpoint_a_failed_start_keeps_it_and_the_run_resumes_bitwise(tmp_path):
    """The README's first command, a few steps of it, is the uninterrupted run. The same run
    interrupted by Ctrl-C once a checkpoint is committed, then started with a bad dataset row (which
    must change nothing), then started again with the README's command (which resumes from the last
    checkpoint) must log the same metrics, bit for bit. Those three runs move the trained state to
    the host and back every step (``train.offload``), the uninterrupted one does not."""
    straight = readme_command(tmp_path / "straight", [*SMALL, "logging.console=true", "train.steps=4", "checkpoint.save_every=1"])
    assert [row["step"] for row in straight] == [0, 1, 2, 3]
    assert_finite(straight)
    overrides = [*SMALL, "logging.console=true", "train.steps=4", "checkpoint.save_every=1", "train.offload=[params,grads,optimizer]"]

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    # Ctrl-C once a checkpoint is committed: every process gets SIGINT, as from a terminal.
    interrupted = launch_readme_command(run_dir, overrides, interrupt_when=lambda: (checkpoints / "step_00000001").is_dir())
    output = interrupted.stdout + interrupted.stderr
    (line,) = [line for line in output.splitlines() if line.startswith("megarl.train:")]
    match = re.fullmatch(rf"megarl\.train: interrupted during step (\d+); the last checkpoint is {checkpoints}/step_(\d+): run the same command to go on from it \(checkpoint\.resume=auto\)", line)
    assert match, output[-5000:]
    step, saved = int(match.group(1)), int(match.group(2))
    # Interrupted in step `step`: before its checkpoint (saved is the step before) or just after it.
    assert saved in (step - 1, step) and saved < 3 and "KeyboardInterrupt" not in output
    config = (run_dir / "config.yaml").read_bytes()
    assert yaml.safe_load(config)["train"]["steps"] == 4

    # A start that fails on bad input (a row past the first: found when the data is loaded, after
    # Megatron is up) leaves the run directory as it was; torchrun's root cause is megarl's line.
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "max 1 2 3", "answer": "3"}\n{"prompt": "max 4 5 6", "answer": \n')
    failed = launch_readme_command(run_dir, [*overrides, f"data.train_files=[{data}]"])
    assert failed.returncode == 1
    cause = failed.stderr[failed.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in cause and f"traceback : megarl.train: {data}:2: not valid JSON" in cause and "Traceback" not in cause
    assert (run_dir / "config.yaml").read_bytes() == config and not list(run_dir.glob("config.step_*"))
    assert [path.name for path in committed_checkpoints(checkpoints)][-1] == f"step_{saved:08d}"

    # The same command goes on from the checkpoint, as if never stopped; its segment's config is
    # kept beside the first.
    resumed = readme_command(run_dir, overrides)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3]
    # Every step released parameters, gradients and the optimizer state (Adam's from step 0's update on).
    assert all(row["offload/bytes_to_host"] > 0 and row["offload/bytes_released"] > row["offload/bytes_to_host"] for row in resumed)
    assert all(row["offload/bytes_to_device"] > 0 for row in resumed)
    for expected, got in zip(straight, resumed):
        for name in RESUMED_METRICS:
            assert got[name] == expected[name], f"step {expected['step']}: {name} {got[name]!r} != {expected[name]!r}"
    # The learning rate warmed up and decays: the schedule was restored, not restarted.
    assert resumed[3]["policy/lr"] < resumed[1]["policy/lr"]
    assert yaml.safe_load((run_dir / f"config.step_{saved + 1}.yaml").read_text())["train"]["steps"] == 4
    assert (run_dir / "config.yaml").read_bytes() == config


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

