"""``python -m megarl.sft`` end to end on CPU: real processes on gloo; the run resumed from its
checkpoint, its checkpoint converted, RL validated and trained from what it exported; bad input
refused before torch is imported."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.resume import committed_checkpoints
from megarl.config import load_config
from megarl.config.sft import SFTConfig
from megarl.preflight import check_run, check_sft_run
from tests.distributed import REPO, free_port, launch

pytestmark = pytest.mark.cpu

SFT = ["--config", "configs/sft.yaml", "train.steps=8", "train.lr_warmup_steps=0", "checkpoint.save_every=4", "logging.console=false"]
"""8 steps of the bundled SFT config (64 conversations each: 1.28 epochs of its 400), a checkpoint
after steps 3 and 7, the HF export after the last."""

RESUMED_METRICS = ("sft/loss", "sft/grad_norm", "sft/lr", "sft/assistant_tokens")

VALIDATION_ACCURACY_AFTER_SFT = 0.4
"""The least greedy accuracy on the validation set (the 200 prompts of bundled:toy/val.jsonl) that
the 8 steps must give: measured 0.68 after them and 0.0 for the bundled tiny-moe they start from
(the same RL command with model.path=bundled:tiny-moe), 0.305 after 4 steps."""


def torchrun(module: str, arguments: list[str]):
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", f"--master_port={free_port()}", "-m", module, *arguments]
    check(launch(command, {}, timeout=300))


def check(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"{' '.join(result.args)}: exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_files(directory: Path, expected: Path):
    """``directory`` holds exactly ``expected``'s files, byte for byte."""
    names = sorted(path.name for path in expected.iterdir())
    assert sorted(path.name for path in directory.iterdir()) == names
    for name in names:
        assert (directory / name).read_bytes() == (expected / name).read_bytes(), f"{directory / name} differs from {expected / name}"


@pytest.mark.multirank
def test_sft_loss_falls_resumes_bitwise_converts_as_it_exports_and_rl_validates_and_trains_from_it(tmp_path):
    sft_dir = tmp_path / "sft"
    torchrun("megarl.sft", [*SFT, f"logging.run_dir={sft_dir}"])
    rows = metrics(sft_dir)
    losses = [row["sft/loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(8))
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(row["sft/assistant_tokens"] == 2 * 64 for row in rows)  # the digit and the end of turn
    checkpoints = sft_dir / "checkpoints"
    assert [path.name for path in committed_checkpoints(checkpoints)] == ["step_00000003", "step_00000007"]

    # The run stopped after step 3 (its checkpoint all that is left), the same command again: it
    # goes on at step 4 with the same conversations, learning rate and random streams, bit for bit.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoints / "step_00000003", resumed_dir / "checkpoints" / "step_00000003")
    # tools/convert_to_hf.py (one process, EP 1: resharded from the run's EP 2) meanwhile.
    converted = tmp_path / "converted"
    conversion = [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(checkpoints), "--out", str(converted)]
    with subprocess.Popen(conversion, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        torchrun("megarl.sft", [*SFT, f"logging.run_dir={resumed_dir}"])
        stdout, stderr = process.communicate(timeout=300)
    check(subprocess.CompletedProcess(conversion, process.returncode, stdout, stderr))
    resumed = metrics(resumed_dir)
    assert [row["step"] for row in resumed] == [4, 5, 6, 7]
    for expected, got in zip(rows[4:], resumed):
        for name in RESUMED_METRICS:
            assert got[name] == expected[name], f"step {expected['step']}: {name} {got[name]!r} != {expected[name]!r}"
    assert_same_files(resumed_dir / "hf", sft_dir / "hf")
    # The conversion tool writes the run's own export (checkpoint.save_hf), byte for byte.
    assert_same_files(converted, sft_dir / "hf")

    rl_dir = tmp_path / "rl"
    torchrun("megarl.train", [
        "--config", "configs/moe_grpo.yaml", f"model.path={sft_dir / 'hf'}", "train.steps=1", "train.eval_every=0", "train.val_before_train=true",
        "rollout.batch_size=4", "train.global_batch_size=32", "train.mini_batch_size=32", "train.micro_batch_size=16",
        "algorithm.dynamic_sampling=false", "logging.console=false", f"logging.run_dir={rl_dir}",
    ])
    (rl_row,) = metrics(rl_dir)
    # The fine-tuned model answers the validation prompts (greedy, RL's validation), the base none.
    assert rl_row["val/accuracy_before_train"] >= VALIDATION_ACCURACY_AFTER_SFT, rl_row["val/accuracy_before_train"]
    # One RL step from the fine-tuned weights: rolled out, scored and trained.
    assert rl_row["rollout/prompts"] == 4 and math.isfinite(rl_row["policy/grad_norm"]) and rl_row["policy/skipped_steps"] == 0, rl_row


COMMAND_PROBE = """
import sys
from megarl.sft import main
code = main(sys.argv[1:])
print(sorted(name for name in ("torch", "transformers", "megatron.core") if name in sys.modules))
sys.exit(code)
"""
"""``python -m megarl.sft`` that also says which heavy libraries it imported."""

GOOD_ROW = '{"messages": [{"role": "user", "content": "max 1 2 3"}, {"role": "assistant", "content": "3"}]}\n'


def test_bad_data_is_refused_by_file_and_line_before_torch_is_imported(tmp_path):
    missing, broken, unanswered = tmp_path / "missing.jsonl", tmp_path / "broken.jsonl", tmp_path / "unanswered.jsonl"
    broken.write_text(GOOD_ROW + '{"messages": [{"role": "user", "content": "max 4 5 6"}\n')
    unanswered.write_text(GOOD_ROW * 2 + '{"messages": [{"role": "user", "content": "max 4 5 6"}]}\n')
    cases = {
        "bad files": (
            [f"data.train_files=[{missing}, {broken}, {unanswered}]"],
            f"data.train_files: {missing} does not exist",
            f"data.train_files: {broken}:2: not valid JSON",
            f"data.train_files: {unanswered}:3: the conversation has no assistant turn",
        ),
        "wrong messages key": (["data.messages_key=conversation"], "sft.jsonl:1: no field 'conversation' (data.messages_key); the row has ['messages']"),
    }
    for case, (overrides, *expected) in cases.items():
        arguments = ["--config", "configs/sft.yaml", *overrides, f"logging.run_dir={tmp_path / 'run'}"]
        command = subprocess.run(
            [sys.executable, "-c", COMMAND_PROBE, *arguments], cwd=REPO, env={**os.environ, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120
        )
        assert (command.returncode, command.stdout) == (2, "[]\n"), f"{case}: {command.stderr}"
        lines = command.stderr.splitlines()
        assert len(lines) == len(expected) and all(line.startswith("megarl.sft: ") and part in line for line, part in zip(lines, expected)), case
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_is_refused_as_rl_refuses_it(tmp_path):
    damaged = tmp_path / "checkpoints" / "step_00000004"
    (damaged / "weights").mkdir(parents=True)
    overrides = [f"checkpoint.dir={damaged.parent}"]
    sft, rl = load_config(REPO / "configs" / "sft.yaml", overrides, root=SFTConfig), load_config(REPO / "configs" / "moe_grpo.yaml", overrides)
    refusal = f"checkpoint {damaged} is damaged: train_state.json is missing; no checkpoint under {damaged.parent} is intact (1 damaged)"
    (problem,) = check_sft_run(sft, 2)
    assert problem.startswith(refusal) and problem in check_run(rl, 2)
    sft.checkpoint.resume = rl.checkpoint.resume = str(damaged)
    (problem,) = check_sft_run(sft, 2)
    assert problem.startswith(f"checkpoint {damaged} is damaged") and problem in check_run(rl, 2)
