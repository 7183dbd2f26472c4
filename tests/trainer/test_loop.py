"""The synchronous step's rollout (over-sampling by the keep rate, top-up) and how its batch reaches
every rank (tensors, or rank 0's error)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from types import SimpleNamespace

import pytest
import torch

from megarl.trainer import loop
from megarl.trainer.batch import ScoredSample, TrainBatch
from megarl.trainer.loop import KEEP_RATE_MEMORY, round_batches
from megarl.trainer.rollout import RoundMetric
from tests.distributed import run_torchrun


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("missing", "keep_rate", "batches"),
    [(128, 1.0, 1), (128, 0.5, 2), (128, 0.3, 4), (128, 0.26, 4), (40, 0.5, 1), (72, 0.5, 2), (128, 0.0, 1000)],
)
def test_a_round_asks_for_the_loader_batches_the_missing_groups_need_at_the_keep_rate(missing, keep_rate, batches):
    # 8 samples a prompt, 16 prompts a loader batch: 128 missing samples are 16 groups.
    assert round_batches(missing, 8, 16, keep_rate) == batches


def scripted_round(kept_per_round: list[int], calls: list[dict]):
    """A stand-in for ``generate_round``: round ``r`` of ``batches`` loader batches keeps the first
    ``kept_per_round[r]`` of its groups (mixed scores), the others score all 1."""

    def generate_round(run, step, round_index, *, batches, first_group):
        calls.append({"round": round_index, "batches": batches, "first_group": first_group})
        prompts = batches * run.config.rollout.batch_size
        samples = []
        for prompt in range(prompts):
            mixed = prompt < kept_per_round[round_index]
            for sample in range(run.config.rollout.n_samples_per_prompt):
                score = float(sample % 2) if mixed else 1.0
                samples.append(ScoredSample([1, 2], [3], [-0.5], "stop", first_group + prompt, score))
        metrics = {"time/generate_s": RoundMetric(0.1, adds_up=True), "rollout/prompts": RoundMetric(prompts, adds_up=True)}
        return metrics, samples

    return generate_round


def fake_run(keep_rate: float):
    config = SimpleNamespace(
        train=SimpleNamespace(global_batch_size=128),
        rollout=SimpleNamespace(batch_size=16, n_samples_per_prompt=8),
        algorithm=SimpleNamespace(dynamic_sampling=True, dynamic_sampling_mean_range=None, max_num_gen_batches=4),
    )
    return SimpleNamespace(config=config, keep_rate=keep_rate)


def scripted_roll_out(monkeypatch, kept_per_round: list[int], keep_rate: float):
    """``loop.roll_out`` of a run at ``keep_rate`` over :func:`scripted_round`; returns the run,
    the samples, the metrics and the rounds asked for."""
    calls: list[dict] = []
    monkeypatch.setattr(loop, "generate_round", scripted_round(kept_per_round, calls))
    run = fake_run(keep_rate)
    samples, metrics = loop.roll_out(run, step=0)
    return run, samples, metrics, calls


@pytest.mark.cpu
def test_a_step_rolls_out_what_the_keep_rate_says_in_one_call_and_updates_the_rate(monkeypatch):
    # Keep rate 0.5: 16 groups needed -> 2 loader batches (32 prompts) in one call; 20 kept.
    run, samples, metrics, calls = scripted_roll_out(monkeypatch, [20], 0.5)
    assert calls == [{"round": 0, "batches": 2, "first_group": 0}]
    assert len(samples) == 128 and {sample.group for sample in samples} == set(range(16))
    assert metrics["rollout/rounds"] == 1 and metrics["rollout/prompts"] == 32
    assert metrics["filter/groups"] == 32 and metrics["filter/groups_kept"] == 20 and metrics["filter/keep_rate"] == 0.5
    assert "filter/topped_up_samples" not in metrics
    assert run.keep_rate == pytest.approx(KEEP_RATE_MEMORY * 20 / 32 + (1 - KEEP_RATE_MEMORY) * 0.5)


@pytest.mark.cpu
def test_a_round_that_falls_short_is_followed_by_one_sized_by_the_updated_rate(monkeypatch):
    # Rate 1.0 -> 1 batch; only 4 of 16 kept: the step's rate 0.25 -> 0.5 * 0.25 + 0.5 * 1.0 = 0.625,
    # so the 12 missing groups ask for ceil(12 / (0.625 * 16)) = 2 batches; 12 of their 32 kept.
    run, samples, metrics, calls = scripted_roll_out(monkeypatch, [4, 12], 1.0)
    assert calls == [{"round": 0, "batches": 1, "first_group": 0}, {"round": 1, "batches": 2, "first_group": 16}]
    assert len(samples) == 128 and metrics["rollout/rounds"] == 2 and metrics["rollout/prompts"] == 48
    assert {sample.group for sample in samples} == set(range(4)) | set(range(16, 28))
    assert run.keep_rate == pytest.approx(KEEP_RATE_MEMORY * 16 / 48 + (1 - KEEP_RATE_MEMORY) * 1.0)


@pytest.mark.cpu
def test_when_the_budget_is_spent_the_batch_is_topped_up_from_the_reserve(monkeypatch):
    run, samples, metrics, calls = scripted_roll_out(monkeypatch, [3], 0.1)
    # The whole budget (algorithm.max_num_gen_batches) in one call, 3 groups kept, 13 groups' samples from the reserve in order.
    assert calls == [{"round": 0, "batches": 4, "first_group": 0}]
    assert len(samples) == 128 and metrics["filter/topped_up_samples"] == 104
    assert [sample.group for sample in samples[::8]] == [0, 1, 2, *range(3, 16)]


@pytest.mark.cpu
def test_a_batch_survives_its_tensors():
    batch = TrainBatch.from_samples(
        [[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]], [[-0.1, -0.2], [-0.3, -0.4, -0.5]], [0, 1], [False, True], pad_token_id=0, pad_multiple=2
    )
    batch.token_values["old_log_probs"] = torch.randn(batch.tokens.shape)
    batch.routed_experts = torch.randint(0, 8, (*batch.tokens.shape, 3, 2), dtype=torch.uint8)
    batch.routed_lengths = torch.tensor([4, 4])
    batch.reward_baselines = torch.tensor([0.5, -1.0])
    copy = TrainBatch.from_tensors({name: tensor.clone() for name, tensor in batch.tensors().items()}, pad_multiple=2)
    for field in dataclasses.fields(TrainBatch):
        if field.name == "token_values":
            assert copy.token_values.keys() == batch.token_values.keys()
            assert all(torch.equal(copy.token_values[name], values) for name, values in batch.token_values.items())
        elif field.name == "pad_multiple":
            assert copy.pad_multiple == 2
        else:
            value = getattr(copy, field.name)
            assert torch.equal(value, getattr(batch, field.name)) and value.dtype == getattr(batch, field.name).dtype


SHARE_WORKER = textwrap.dedent(
    """
    import json, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from megarl.trainer import loop
    from megarl.trainer.batch import TrainBatch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run = SimpleNamespace(is_first_rank=rank == 0, keep_rate=0.25 if rank == 0 else 1.0)

    def work():
        batch = TrainBatch.from_samples(
            [[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]], [[-0.1, -0.2], [-0.3, -0.4, -0.5]], [3, 4], [False, True],
            pad_token_id=0, pad_multiple=4,
        )
        batch.routed_experts = torch.arange(2 * 8 * 3 * 2, dtype=torch.uint8).reshape(2, 8, 3, 2)
        return batch, torch.tensor([1.0, 0.0]), {"reward/mean": 0.5}

    batch, scores, metrics = loop.share_batch(run, work)
    report = {
        "tensors": {name: [str(tensor.dtype), tensor.tolist()] for name, tensor in batch.tensors().items()},
        "pad_multiple": batch.pad_multiple, "scores": scores.tolist(), "metrics": metrics, "keep_rate": run.keep_rate,
    }

    def failing():
        raise ValueError("no engine answered")

    try:
        loop.share_batch(run, failing)
    except Exception as error:
        report["error"] = f"{type(error).__name__}: {error}"
    with open(sys.argv[1] + f".{rank}", "w") as out:
        json.dump(report, out)
    dist.destroy_process_group()
    """
)


@pytest.mark.multirank
def test_the_batch_and_rank_0s_error_reach_every_rank(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(SHARE_WORKER)
    run_torchrun(script, [str(tmp_path / "report")], nproc=2, timeout=120)
    first, second = (json.loads((tmp_path / f"report.{rank}").read_text()) for rank in (0, 1))
    assert second["tensors"] == first["tensors"] and second["scores"] == first["scores"] == [1.0, 0.0]
    assert second["metrics"] == {"reward/mean": 0.5} and second["keep_rate"] == 0.25 and second["pad_multiple"] == 4
    assert first["tensors"]["truncated"] == ["torch.bool", [False, True]]
    assert first["tensors"]["routed_experts"] == ["torch.uint8", torch.arange(96).reshape(2, 8, 3, 2).tolist()]
    assert first["error"] == "ValueError: no engine answered"
    assert second["error"] == "TrainingStopped: the first rank failed: ValueError: no engine answered"

