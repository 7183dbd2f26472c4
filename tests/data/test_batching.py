"""Micro-batching: every sample once, budgets kept, the same micro-batch count on every rank;
Karmarkar-Karp partitions and the packed plan."""

from __future__ import annotations

import random

import pytest

from megarl.config import TrainConfig
from megarl.data.batching import (
    _split_heaviest,
    aligned_length,
    fixed_micro_batches,
    karmarkar_karp,
    packed_tokens,
    padded_tokens,
    plan_micro_batches,
    split_across_ranks,
    token_budget_micro_batches,
)

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


def long_tailed_lengths(count: int, seed: int, prompt: int = 64) -> list[int]:
    """A prompt of ``prompt`` tokens and a log-normal(5, 1) response clipped to 16-1024 tokens:
    most answers short, a few at the limit."""
    generator = random.Random(seed)
    return [prompt + min(1024, max(16, round(generator.lognormvariate(5, 1)))) for _ in range(count)]


def spread(parts, weights) -> int:
    sums = [sum(weights[index] for index in part) for part in parts]
    return max(sums) - min(sums)


def longest_first_to_lightest(weights, parts: int) -> list[list[int]]:
    """The greedy partition (LPT) that Karmarkar-Karp should beat."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    sums = [0] * parts
    for index in sorted(range(len(weights)), key=lambda index: (-weights[index], index)):
        part = min(range(parts), key=lambda part: (sums[part], part))
        groups[part].append(index)
        sums[part] += weights[index]
    return groups


def test_karmarkar_karp_on_the_textbook_example():
    # Differencing alone ends at 16 | 14 ({8, 6} against {7, 5, 4}); one exchange evens it.
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2)
    assert parts == [[2, 3, 4], [0, 1]]
    assert spread(parts, [8, 7, 6, 5, 4]) == 0


@pytest.mark.parametrize("equal_size", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_karmarkar_karp_spreads_less_than_greedy(parts, equal_size):
    for seed in range(8):
        weights = long_tailed_lengths(parts * (64 // parts), seed)
        result = karmarkar_karp(weights, parts, equal_size=equal_size)
        assert sorted(index for part in result for index in part) == list(range(len(weights)))
        assert all(part == sorted(part) for part in result)
        sums = [sum(weights[index] for index in part) for part in result]
        assert sums == sorted(sums, reverse=True)
        if equal_size:
            assert {len(part) for part in result} == {len(weights) // parts}
            greedy = split_across_ranks(weights, parts)
        else:
            greedy = longest_first_to_lightest(weights, parts)
        assert spread(result, weights) <= spread(greedy, weights)
        # Within 1% of a part's mean weight (some 2,300 tokens at 8 parts).
        assert spread(result, weights) <= 0.01 * sum(weights) / parts


def test_karmarkar_karp_is_deterministic_and_breaks_ties_by_index():
    weights = long_tailed_lengths(48, seed=3)
    assert karmarkar_karp(weights, 4) == karmarkar_karp(list(weights), 4)
    assert karmarkar_karp([5] * 6, 3, equal_size=True) == [[0, 5], [1, 4], [2, 3]]
    # Equal sums: the part with more items first.
    assert karmarkar_karp([2.5, 1.0, 1.5], 2) == [[1, 2], [0]]


def test_karmarkar_karp_with_few_items():
    assert karmarkar_karp([3, 1], 4) == [[0], [1], [], []]
    assert karmarkar_karp([], 2) == [[], []]
    # A zero weight still fills a part before an empty one is left.
    assert karmarkar_karp([0, 0, 5], 2) == [[2], [0, 1]]
    assert karmarkar_karp([0, 0], 2) == [[0], [1]]


def test_karmarkar_karp_never_leaves_a_part_empty_that_an_item_could_fill():
    generator = random.Random(0)
    for _ in range(300):
        parts, count = generator.randint(1, 9), generator.randint(0, 30)
        weights = [generator.choice([0, 0, 1, 2, generator.randint(0, 100)]) for _ in range(count)]
        result = karmarkar_karp(weights, parts)
        assert sorted(index for part in result for index in part) == list(range(count))
        assert sum(1 for part in result if part) == min(parts, count)


def test_karmarkar_karp_errors():
    with pytest.raises(ValueError, match="at least one part, got parts=0"):
        karmarkar_karp([1, 2], 0)
    with pytest.raises(ValueError, match="weight 1 is -2"):
        karmarkar_karp([1, -2], 2)
    with pytest.raises(ValueError, match="5 items cannot be split into 2 parts of the same size"):
        karmarkar_karp([1] * 5, 2, equal_size=True)


def test_aligned_length():
    assert [aligned_length(length, 4) for length in (0, 1, 4, 5, 8)] == [0, 4, 4, 8, 8]
    assert aligned_length(7, 1) == 7
    with pytest.raises(ValueError, match="multiple of 0: the multiple must be at least 1"):
        aligned_length(7, 0)
    # Samples to multiples of 4 (5 -> 8, 3 -> 4), the pack to a multiple of 6 (12 -> 12, 14 -> 18).
    assert packed_tokens([0, 1], [5, 3], sample_multiple=4, pack_multiple=6) == 12
    assert packed_tokens([0, 1, 2], [5, 3, 1], sample_multiple=4, pack_multiple=6) == 18


def check_plan(plan, lengths, data_parallel_size):
    """Every sample exactly once, ascending in its micro-batch, the same count on every rank, none
    empty."""
    assert len(plan) == data_parallel_size
    assert len({len(rank) for rank in plan}) == 1
    assert flatten(micro for rank in plan for micro in rank) == list(range(len(lengths)))
    assert all(micro and micro == sorted(micro) for rank in plan for micro in rank)


PACKED_LAYOUTS = [(1, 1), (4, 1), (1, 8), (4, 12)]


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("data_parallel_size", [1, 2, 4])
@pytest.mark.parametrize(("sample_multiple", "pack_multiple"), PACKED_LAYOUTS)
def test_packed_plan_keeps_the_budget_after_alignment(balanced, data_parallel_size, sample_multiple, pack_multiple):
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=1200)
    for seed in range(3):
        lengths = long_tailed_lengths(48, seed)
        plan = plan_micro_batches(
            lengths, data_parallel_size, train, packing=True, balanced=balanced, sample_multiple=sample_multiple, pack_multiple=pack_multiple
        )
        check_plan(plan, lengths, data_parallel_size)
        sizes = [packed_tokens(micro, lengths, sample_multiple=sample_multiple, pack_multiple=pack_multiple) for rank in plan for micro in rank]
        assert max(sizes) <= 1200
        assert all(size % pack_multiple == 0 for size in sizes)
        assert plan == plan_micro_batches(
            lengths, data_parallel_size, train, packing=True, balanced=balanced, sample_multiple=sample_multiple, pack_multiple=pack_multiple
        )


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("data_parallel_size", [1, 2, 4])
def test_packed_plan_with_fixed_size_micro_batches(balanced, data_parallel_size):
    train = TrainConfig(micro_batch_size=5)
    lengths = long_tailed_lengths(48, seed=data_parallel_size)
    plan = plan_micro_batches(lengths, data_parallel_size, train, packing=True, balanced=balanced)
    check_plan(plan, lengths, data_parallel_size)
    per_rank = 48 // data_parallel_size
    assert len(plan[0]) == -(-per_rank // 5)
    assert all(len(micro) <= 5 for rank in plan for micro in rank)


def test_packed_plan_balances_ranks_and_orders_micro_batches_by_cost():
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=4096)
    lengths = long_tailed_lengths(64, seed=0)
    linear_cost = 4 * 896 + 3 * 4864  # hidden size 896, SwiGLU width 4864
    plan = plan_micro_batches(lengths, 2, train, packing=True, linear_cost=linear_cost)
    rank_tokens = [sum(lengths[index] for micro in rank for index in micro) for rank in plan]
    assert max(rank_tokens) - min(rank_tokens) <= 2
    costs = [[sum(lengths[index] * (linear_cost + lengths[index]) for index in micro) for micro in rank] for rank in plan]
    assert all(rank == sorted(rank, reverse=True) for rank in costs)
    # Micro-batch i costs about the same on both ranks.
    assert all(abs(first - second) <= 0.01 * max(first, second) for first, second in zip(*costs))


def test_packed_plan_when_every_sample_needs_its_own_micro_batch():
    # Two samples per rank, any two together over the budget: two micro-batches of one sample each.
    lengths = [70, 60, 65, 55]
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=100)
    for balanced in (True, False):
        plan = plan_micro_batches(lengths, 2, train, packing=True, balanced=balanced)
        check_plan(plan, lengths, 2)
        assert [len(micro) for rank in plan for micro in rank] == [1, 1, 1, 1]
    # 180 tokens would fit two packs of 100, but no two samples of 60 do: the count grows to three.
    plan = plan_micro_batches([60, 60, 60], 1, train, packing=True)
    assert sorted(plan[0]) == [[0], [1], [2]]
    # One rank's samples (90 + 10) fit one pack, the other's (95 + 10) need two: both ranks run two.
    lengths = [95, 90, 10, 10]
    for balanced in (True, False):
        plan = plan_micro_batches(lengths, 2, train, packing=True, balanced=balanced)
        check_plan(plan, lengths, 2)
        assert len(plan[0]) == 2
    # Fewer samples than a micro-batch holds: one micro-batch per rank.
    plan = plan_micro_batches([3, 4], 2, TrainConfig(micro_batch_size=8), packing=True)
    assert plan == [[[1]], [[0]]]
    assert plan_micro_batches([], 2, train, packing=True) == [[], []]


def test_packed_plan_errors():
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=100)
    with pytest.raises(ValueError, match=r"sample 1 has 99 tokens, 104 once packed .* more than train.max_tokens_per_micro_batch \(100\)"):
        plan_micro_batches([10, 99], 1, train, packing=True, sample_multiple=4, pack_multiple=8)
    with pytest.raises(ValueError, match="10 samples cannot be split evenly over 4"):
        plan_micro_batches([1] * 10, 4, train, packing=True)
    with pytest.raises(ValueError, match=r"sample_multiple \(0\) and pack_multiple \(1\) must be at least 1"):
        plan_micro_batches([1] * 4, 1, train, packing=True, sample_multiple=0)
    with pytest.raises(ValueError, match=r"linear_cost \(-1.0\) must be at least 0"):
        plan_micro_batches([1] * 4, 1, train, packing=True, linear_cost=-1.0)


def test_packing_off_keeps_the_padded_plan():
    lengths = long_tailed_lengths(64, seed=1)
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=4096)
    assert plan_micro_batches(lengths, 2, train, balanced=False, sample_multiple=8, pack_multiple=8) == plan_micro_batches(lengths, 2, train)


def test_balanced_packing_needs_fewer_micro_batches_on_a_long_tail():
    # Issue 21's distribution: 64 samples, 64 prompt tokens + log-normal responses of 16-1024
    # tokens, 2 data-parallel ranks, 4096 tokens per micro-batch.
    train = TrainConfig(dynamic_batch=True, max_tokens_per_micro_batch=4096)
    for seed in range(4):
        lengths = long_tailed_lengths(64, seed)
        padded = plan_micro_batches(lengths, 2, train)
        greedy = plan_micro_batches(lengths, 2, train, packing=True, balanced=False)
        balanced = plan_micro_batches(lengths, 2, train, packing=True)
        assert len(balanced[0]) < len(padded[0])
        assert len(balanced[0]) <= len(greedy[0])
        sizes = [packed_tokens(micro, lengths) for rank in balanced for micro in rank]
        greedy_sizes = [packed_tokens(micro, lengths) for rank in greedy for micro in rank]
        assert max(sizes) - min(sizes) <= 0.01 * max(sizes) < max(greedy_sizes) - min(greedy_sizes)


@pytest.mark.parametrize("packing,balanced,dynamic", [(False, True, True), (False, True, False), (True, True, True), (True, False, True), (True, True, False), (True, False, False)])
def test_the_micro_batch_count_is_rounded_to_the_multiple_virtual_pipelining_needs(packing, balanced, dynamic):
    lengths = [40, 7, 33, 12, 5, 28, 19, 9, 30, 3, 14, 22]
    train = TrainConfig(dynamic_batch=dynamic, max_tokens_per_micro_batch=100, micro_batch_size=4)
    plain = plan_micro_batches(lengths, 2, train, packing=packing, balanced=balanced)
    plan = plan_micro_batches(lengths, 2, train, packing=packing, balanced=balanced, count_multiple=4)
    assert len(plain[0]) % 4 and len(plan[0]) == len(plan[1]) == 4
    assert sorted(index for rank in plan for micro in rank for index in micro) == list(range(len(lengths)))
    assert all(micro for rank in plan for micro in rank)
    # No more micro-batches than a rank has samples.
    assert len(plan_micro_batches(lengths[:4], 2, train, packing=packing, balanced=balanced, count_multiple=4)[0]) == 2
