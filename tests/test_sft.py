"""``python -m megarl.sft`` end to end on CPU: real processes on gloo, then RL from what it exported."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from megarl.checkpoint import committed_checkpoints
from tests.distributed import free_port, launch

pytestmark = pytest.mark.cpu


def torchrun(module: str, arguments: list[str]):
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", f"--master_port={free_port()}", "-m", module, *arguments]
    result = launch(command, {}, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}: exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"


@pytest.mark.multirank
def test_sft_loss_falls_and_rl_starts_from_its_export(tmp_path):
    sft_dir = tmp_path / "sft"
    torchrun("megarl.sft", ["--config", "configs/sft.yaml", "train.steps=4", "train.lr_warmup_steps=0", "logging.console=false", f"logging.run_dir={sft_dir}"])
    rows = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["sft/loss"] for row in rows]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(row["sft/assistant_tokens"] == 2 * 64 for row in rows)  # the digit and the end of turn
    assert [path.name for path in committed_checkpoints(sft_dir / "checkpoints")] == ["step_00000003"]

    rl_dir = tmp_path / "rl"
    torchrun("megarl.train", [
        "--config", "configs/moe_grpo.yaml", f"model.path={sft_dir / 'hf'}", "train.steps=1", "train.eval_every=0", "rollout.batch_size=4",
        "train.global_batch_size=32", "train.mini_batch_size=32", "train.micro_batch_size=16", "algorithm.dynamic_sampling=false",
        "logging.console=false", f"logging.run_dir={rl_dir}",
    ])
    (rl_row,) = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    # One RL step from the fine-tuned weights: rolled out, scored and trained.
    assert rl_row["rollout/prompts"] == 4 and math.isfinite(rl_row["policy/grad_norm"]) and rl_row["policy/skipped_steps"] == 0, rl_row
