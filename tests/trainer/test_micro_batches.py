"""The forward-only passes' micro-batches: their own size and token budget, the update's when null
(a sample's log-probs under them: tests/trainer/test_forward_log_probs.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megarl.config import TrainConfig
from megarl.trainer.batch import TrainBatch
from megarl.trainer.micro_batches import rank_micro_batches

pytestmark = pytest.mark.cpu

LENGTHS = [(5, 7), (9, 3), (4, 10), (6, 4), (3, 1), (7, 9), (2, 5), (8, 2)]
"""(prompt, response) tokens of the batch's samples: 12, 12, 14, 10, 4, 16, 7, 10 tokens."""


class Group:
    """A process group of one rank."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


SINGLE = SimpleNamespace(dp=Group(), tp=Group(), cp=Group(), pp=Group())
TRANSFORMER = SimpleNamespace(sequence_parallel=False, hidden_size=8, ffn_hidden_size=16, num_moe_experts=None)


def _batch() -> TrainBatch:
    prompts = [list(range(1, prompt + 1)) for prompt, _ in LENGTHS]
    responses = [list(range(1, response + 1)) for _, response in LENGTHS]
    return TrainBatch.from_samples(
        prompts, responses, [[0.0] * len(response) for response in responses], list(range(len(LENGTHS))), [False] * len(LENGTHS), pad_token_id=0, pad_multiple=1,
    )


def _micro_batches(train: TrainConfig) -> list[dict[str, torch.Tensor]]:
    batch = _batch()
    return rank_micro_batches(batch, torch.arange(batch.size), (), train=train, pg_collection=SINGLE, transformer_config=TRANSFORMER, interleaved=False)


def test_forward_only_takes_the_forward_sizes_and_the_updates_where_they_are_null():
    train = TrainConfig(micro_batch_size=2, max_tokens_per_micro_batch=64)
    assert (train.forward_only().micro_batch_size, train.forward_only().max_tokens_per_micro_batch) == (2, 64)
    train = TrainConfig(micro_batch_size=2, max_tokens_per_micro_batch=64, forward_micro_batch_size=8, forward_max_tokens_per_micro_batch=256)
    assert (train.forward_only().micro_batch_size, train.forward_only().max_tokens_per_micro_batch) == (8, 256)
    assert (train.micro_batch_size, train.max_tokens_per_micro_batch) == (2, 64)
    # A run counted in epochs, its steps resolved once the data is loaded (as megarl.trainer.run does).
    epochs = TrainConfig(steps=None, total_epochs=1, micro_batch_size=2, forward_micro_batch_size=8)
    epochs.steps = 2
    forward = epochs.forward_only()
    assert (forward.micro_batch_size, forward.steps, forward.total_epochs, epochs.micro_batch_size) == (8, 2, 1, 2)


@pytest.mark.parametrize("packing", [False, True])
def test_forward_only_micro_batches_are_cut_by_their_own_size(packing):
    train = TrainConfig(micro_batch_size=2, forward_micro_batch_size=8, packing=packing)
    update, forward = _micro_batches(train), _micro_batches(train.forward_only())
    assert [len(micro["rows"]) for micro in update] == [2, 2, 2, 2]
    assert [sorted(micro["rows"].tolist()) for micro in forward] == [list(range(8))]


@pytest.mark.parametrize("packing", [False, True])
def test_forward_only_micro_batches_are_cut_by_their_own_token_budget(packing):
    # 85 real tokens; padded, the longest (16) times 8 rows is 128.
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=32, forward_max_tokens_per_micro_batch=128, packing=packing)
    update, forward = _micro_batches(train), _micro_batches(train.forward_only())
    assert len(update) >= 3
    assert len(forward) == 1
    assert sorted(row for micro in update for row in micro["rows"].tolist()) == list(range(8))

