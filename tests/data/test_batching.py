"""Micro-batching: every sample once, budgets kept, the same micro-batch count on every rank."""

from __future__ import annotations

import random

import pytest

from megarl.config import TrainConfig
from megarl.data.batching import _split_heaviest, fixed_micro_batches, padded_tokens, plan_micro_batches, split_across_ranks, token_budget_micro_batches

pytestmark = pytest.mark.cpu


def random_lengths(count: int, seed: int, longest: int = 80) -> list[int]:
    generator = random.Random(seed)
    return [generator.randint(1, longest) for _ in range(count)]


def flatten(groups) -> list[int]:
    return sorted(index for group in groups for index in group)


@pytest.mark.parametrize("data_parallel_size", [1, 2, 3, 4])
def test_ranks_get_equal_counts_and_balanced_tokens(data_parallel_size):
    lengths = random_lengths(48, seed=data_parallel_size)
    ranks = split_across_ranks(lengths, data_parallel_size)
    assert flatten(ranks) == list(range(48))
    assert {len(indices) for indices in ranks} == {48 // data_parallel_size}
    totals = [sum(lengths[index] for index in indices) for indices in ranks]
    assert max(totals) - min(totals) <= max(lengths)


def test_ranks_need_a_divisible_batch():
    with pytest.raises(ValueError, match="10 samples cannot be split evenly over 4"):
        split_across_ranks([1] * 10, 4)


def test_fixed_micro_batches_group_similar_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8]
    micro_batches = fixed_micro_batches(lengths, 2)
    assert [len(micro) for micro in micro_batches] == [2, 2, 2, 1]
    assert flatten(micro_batches) == list(range(7))
    assert micro_batches[0] == [0, 2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_tokens", [80, 150, 400])
def test_token_budget_micro_batches_keep_the_budget_after_padding(seed, max_tokens):
    lengths = random_lengths(40, seed)
    micro_batches = token_budget_micro_batches(lengths, max_tokens)
    assert flatten(micro_batches) == list(range(40))
    assert all(micro and padded_tokens(micro, lengths) <= max_tokens for micro in micro_batches)
    # Sorted runs pad little: never more than twice the micro-batches the unpadded tokens need,
    # plus one.
    assert len(micro_batches) <= 2 * -(-sum(lengths) // max_tokens) + 1


def test_a_long_sample_does_not_share_its_micro_batch_with_many_short_ones():
    # 9 + 7 x 1 = 16 tokens unpadded, but 8 x 9 = 72 once padded: the long sample goes alone.
    lengths = [1, 1, 9, 1, 1, 1, 1, 1]
    micro_batches = token_budget_micro_batches(lengths, 16)
    assert sorted(micro_batches) == [[0, 1, 3, 4, 5, 6, 7], [2]]


def test_micro_batches_even_out_at_the_smallest_cap():
    # Eight samples of 4 fit in a budget of 32 as one micro-batch; asked for 3, they split 3/3/2
    # rather than 6/1/1.
    micro_batches = token_budget_micro_batches([4] * 8, 32, num_micro_batches=3)
    assert sorted(len(micro) for micro in micro_batches) == [2, 3, 3]


@pytest.mark.parametrize("lengths", [[5, 5, 4, 3, 3], [10, 1, 1, 1, 1, 1, 1], random_lengths(30, seed=11, longest=10)])
def test_token_budget_micro_batches_reach_a_requested_count(lengths):
    fewest = len(token_budget_micro_batches(lengths, 10))
    for count in range(1, len(lengths) + 1):
        micro_batches = token_budget_micro_batches(lengths, 10, num_micro_batches=count)
        assert len(micro_batches) == max(count, fewest)
        assert flatten(micro_batches) == list(range(len(lengths)))
        assert all(micro and padded_tokens(micro, lengths) <= 10 for micro in micro_batches)


def test_halving_the_heaviest_micro_batches_keeps_every_sample():
    lengths = [6, 1, 1, 1, 2, 2, 2, 2]
    halved = _split_heaviest([[0, 1, 2, 3], [4, 5, 6, 7]], lengths, 4)
    # [6, 1, 1, 1] pads to 24 tokens and splits first, into [6, 1] (12) and [1, 1]; [6, 1] still
    # costs more than [2, 2, 2, 2] (8) and splits next.
    assert sorted(sorted(micro) for micro in halved) == [[0], [1], [2, 3], [4, 5, 6, 7]]


def test_token_budget_errors():
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than the micro-batch budget 10"):
        token_budget_micro_batches([3, 12], 10)
    with pytest.raises(ValueError, match="cannot fill 3 micro-batches from 2 samples"):
        token_budget_micro_batches([3, 4], 10, num_micro_batches=3)


@pytest.mark.parametrize("data_parallel_size", [1, 2, 4])
@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_plan_gives_every_rank_the_same_micro_batch_count(data_parallel_size, dynamic_batch):
    # Skewed lengths: a few long samples make one rank need more micro-batches than the others.
    lengths = random_lengths(32, seed=data_parallel_size, longest=20) + [96] * 5 + [10] * 3
    train = TrainConfig(dynamic_batch=dynamic_batch, max_tokens_per_micro_batch=128, micro_batch_size=5)
    plan = plan_micro_batches(lengths, data_parallel_size, train)
    assert len(plan) == data_parallel_size
    assert len({len(rank) for rank in plan}) == 1
    assert flatten(micro for rank in plan for micro in rank) == list(range(len(lengths)))
    assert all(micro for rank in plan for micro in rank)
    if dynamic_batch:
        assert all(padded_tokens(micro, lengths) <= 128 for rank in plan for micro in rank)
    else:
        assert all(len(micro) <= 5 for rank in plan for micro in rank)
