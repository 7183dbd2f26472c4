"""Which samples of a mini-batch go to which data-parallel rank, and to which micro-batch there.

Samples are known here only by their lengths (prompt + response tokens); every function returns
indices into the ``lengths`` it was given.

Equal micro-batch counts. Megatron's ``forward_backward_func`` runs ``num_microbatches`` forward and
backward passes, and every data-parallel rank must run the same number: with expert parallelism
the token all-to-all of every MoE layer runs across data-parallel peers, so a rank with one more
micro-batch would wait for partners that never come (verl and slime agree on the count the same
way). Fixed-size micro-batches get equal counts from equal sample counts per rank. Token-budget
("dynamic") micro-batches agree on the largest count any rank needs; the ranks that need fewer
split their micro-batches further rather than run empty ones, which would still have to take part
in every collective.

Two layouts of a micro-batch. *Padded*: its samples are rows of ``[b, s]``, each padded to the
longest, so it costs samples x the longest length (:func:`padded_tokens`); samples of similar
length go together. *Packed*: its samples are concatenated into one sequence with their boundaries
passed to the attention, so it costs its real tokens: each sample rounded up to
``sample_multiple`` (context parallelism splits every sample into ``2 x CP`` chunks) and the whole
pack rounded up to ``pack_multiple`` (sequence parallelism splits the pack over TP), the rounding
being padding (:func:`packed_tokens`). Any mix of lengths packs equally well, so the packed plan is
free to balance.

The packed plan balances two keys. The first is tokens: they are what the token budget
(``train.max_tokens_per_micro_batch``) and the activation memory see, and what the linear layers
cost. Samples are split over the ranks by :func:`karmarkar_karp` on their aligned tokens, with the
same sample count on every rank; each rank then partitions its samples by tokens into the fewest
packs that keep the budget (the count agreed on by all ranks, grown while a pack overflows). The
second is compute, ``L x (linear_cost + L)`` per sample of ``L`` tokens: the linear layers' cost per
token and the causal attention's per pair of tokens, in units of the latter (a dense layer with
hidden size ``h`` and SwiGLU width ``f``: ``linear_cost = 4h + 3f`` for full multi-head attention,
less with grouped queries). Each rank orders its packs by it, heaviest first, so that micro-batch
``i`` costs about the same on every rank, which is what the per-micro-batch all-to-alls of expert
parallelism wait on. The ranks' totals are balanced on tokens, not compute: with a real model's
``linear_cost`` the two agree (64 samples, log-normal(5, 1) responses + 64 prompt tokens, budget
4096, ``linear_cost`` 18176 (h 896, f 4864), 10 draws: rank totals within 2.5% at 8 ranks, 0.3%
at 2, the micro-batches of one index within 2.5%), while a split on compute alone would trade
tokens, hence micro-batches and memory, for the attention's share. ``linear_cost`` 0 orders the
packs by ``sum(L**2)``.

:func:`plan_micro_batches` does this from the whole mini-batch, on every rank alike. For padded
micro-batches a rank that holds only its own samples gets the same result with an all-reduce::

    count = torch.tensor(len(token_budget_micro_batches(lengths, budget)))
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=data_parallel_group)
    micro_batches = token_budget_micro_batches(lengths, budget, num_micro_batches=int(count))
"""

from __future__ import annotations

import bisect
import functools
import heapq
from collections.abc import Callable, Sequence

from megarl.config import TrainConfig


def split_across_ranks(lengths: Sequence[int], data_parallel_size: int) -> list[list[int]]:
    """Give every data-parallel rank the same number of samples, balancing their token totals.

    Longest first, each sample goes to the rank with the fewest tokens among those not yet full.

    Args:
        lengths: tokens of each sample of the mini-batch.
        data_parallel_size: the number of ranks; it must divide ``len(lengths)``.

    Returns:
        ``[rank][k]``: the sample indices of each rank, ascending.
    """
    if len(lengths) % data_parallel_size:
        raise ValueError(f"{len(lengths)} samples cannot be split evenly over {data_parallel_size} data-parallel ranks")
    per_rank = len(lengths) // data_parallel_size
    ranks: list[list[int]] = [[] for _ in range(data_parallel_size)]
    tokens = [0] * data_parallel_size
    for index in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        rank = min((rank for rank in range(data_parallel_size) if len(ranks[rank]) < per_rank), key=lambda rank: tokens[rank])
        ranks[rank].append(index)
        tokens[rank] += lengths[index]
    return [sorted(indices) for indices in ranks]


def _subset_order(subset: tuple[float, list[int]]) -> tuple[float, int, int]:
    """Heaviest first; among equal sums the fuller, then the one with the lowest index (an empty
    subset sorts after a non-empty one of the same sum, so merging never leaves a part empty).
    ``items`` ascending."""
    total, items = subset
    return (-total, -len(items), items[0] if items else -1)


def karmarkar_karp(weights: Sequence[float], parts: int, *, equal_size: bool = False) -> list[list[int]]:
    """Partition item indices into ``parts`` parts of nearly equal weight: the largest differencing
    method (Karmarkar and Karp 1982) for k-way partitioning.

    Each item starts as a partial partition of its own (the item in one part, the other parts
    empty). The two partial partitions with the largest spread (heaviest minus lightest part) are
    merged by joining the heaviest part of one with the lightest of the other, the second heaviest
    with the second lightest, and so on, which cancels most of both spreads; this repeats until one
    partition is left. With ``equal_size`` the items are sorted by weight and taken ``parts`` at a
    time, each group one partial partition of one item per part (balanced differencing), so every
    merge and the result keep the same number of items in every part. One departure: the result is
    then improved by exchanges of items between parts (:func:`_exchange`), which matters when the
    parts hold few items each.

    Deterministic: equal weights are taken in index order, and equal spreads merge in the order
    their partial partitions were made.

    Args:
        weights: one non-negative weight per item.
        parts: the number of parts, at least 1.
        equal_size: give every part ``len(weights) / parts`` items; ``parts`` must divide
            ``len(weights)``.

    Returns:
        ``[part][k]``: item indices, ascending within a part; the parts heaviest first (equal sums:
        the one with more items, then the one with the lowest index). With fewer items than parts
        every item is alone and the remaining parts are empty; with more, none is empty.

    Raises:
        ValueError: ``parts`` below 1, a negative weight, or ``equal_size`` with a count of items
            that ``parts`` does not divide.
    """
    if parts < 1:
        raise ValueError(f"karmarkar_karp needs at least one part, got parts={parts}")
    negative = [index for index, weight in enumerate(weights) if weight < 0]
    if negative:
        raise ValueError(f"karmarkar_karp needs non-negative weights: weight {negative[0]} is {weights[negative[0]]}")
    if equal_size and len(weights) % parts:
        raise ValueError(f"equal_size: {len(weights)} items cannot be split into {parts} parts of the same size")
    order = sorted(range(len(weights)), key=lambda index: (-weights[index], index))
    group = parts if equal_size else 1
    # (-spread, creation number, subsets heaviest first): the number breaks ties and keeps heapq
    # from comparing the subsets.
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for start in range(0, len(order), group):
        subsets = [(weights[index], [index]) for index in order[start : start + group]]
        subsets += [(0, []) for _ in range(parts - len(subsets))]
        subsets.sort(key=_subset_order)
        heapq.heappush(heap, (subsets[-1][0] - subsets[0][0], len(heap), subsets))
    if not heap:
        return [[] for _ in range(parts)]
    made = len(heap)
    while len(heap) > 1:
        *_, first = heapq.heappop(heap)
        *_, second = heapq.heappop(heap)
        merged = [(heavy + light, sorted(heavy_items + light_items)) for (heavy, heavy_items), (light, light_items) in zip(first, reversed(second))]
        merged.sort(key=_subset_order)
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], made, merged))
        made += 1
    subsets = [(total, sorted(items)) for total, items in _exchange([items for _, items in heap[0][2]], weights, equal_size)]
    subsets.sort(key=_subset_order)
    return [items for _, items in subsets]


def _exchange(parts: list[list[int]], weights: Sequence[float], equal_size: bool) -> list[tuple[float, list[int]]]:
    """Improve a partition by exchanges: while some pair of parts, one of them the heaviest or the
    lightest, can narrow its gap by swapping one item for another (or, without ``equal_size``, by
    moving one item), make the exchange that narrows it most and repeat.

    Balanced differencing merges only ``len(weights) / parts`` partial partitions, too few to even
    out when the parts hold few items each (64 log-normal lengths over 8 parts: about twice the
    spread of the greedy split); the exchanges bring it well below the greedy split's (20 draws:
    mean spread 4 tokens against 96). Each exchange moves weight ``d`` across a gap ``g`` with
    ``0 < d < g``: the heaviest part never gets heavier, a part never empties (its one item would
    have to outweigh the gap it crosses), and the sum of the squared part sums falls by
    ``2 d (g - d)``, so the loop ends.

    Returns:
        ``(weight, items)`` per part.
    """
    parts = [list(items) for items in parts]
    while True:
        sums = [sum(weights[index] for index in items) for items in parts]
        heaviest = min(range(len(parts)), key=lambda part: (-sums[part], part))
        lightest = min(range(len(parts)), key=lambda part: (sums[part], part))
        pairs = [(heaviest, part) for part in range(len(parts)) if sums[part] < sums[heaviest]]
        pairs += [(part, lightest) for part in range(len(parts)) if part != heaviest and sums[part] > sums[lightest]]
        best = None
        for heavy, light in pairs:
            gap = sums[heavy] - sums[light]
            # What the light part can give back, lightest first; (0, -1): nothing (a move).
            offers = sorted([(weights[index], index) for index in parts[light]] + ([] if equal_size else [(0, -1)]))
            offered = [weight for weight, _ in offers]
            for given in parts[heavy]:
                # The exchange narrows the gap most when it moves half of it: the offer nearest
                # weights[given] - gap / 2 is the best for this item.
                position = bisect.bisect_left(offered, weights[given] - gap / 2)
                for weight, taken in offers[max(0, position - 1) : position + 1]:
                    moved = weights[given] - weight
                    if 0 < moved < gap and (best is None or moved * (gap - moved) > best[0]):
                        best = (moved * (gap - moved), heavy, light, given, taken)
        if best is None:
            return list(zip(sums, parts))
        _, heavy, light, given, taken = best
        parts[heavy].remove(given)
        parts[light].append(given)
        if taken >= 0:
            parts[light].remove(taken)
            parts[heavy].append(taken)


def aligned_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (at least 1)."""
    if multiple < 1:
        raise ValueError(f"cannot align {length} tokens to a multiple of {multiple}: the multiple must be at least 1")
    return -(-length // multiple) * multiple


def packed_tokens(micro_batch: Sequence[int], lengths: Sequence[int], *, sample_multiple: int = 1, pack_multiple: int = 1) -> int:
    """What a micro-batch costs once packed into one sequence: each sample rounded up to
    ``sample_multiple``, the sum rounded up to ``pack_multiple`` (the pack's tail padding)."""
    return aligned_length(sum(aligned_length(lengths[index], sample_multiple) for index in micro_batch), pack_multiple)


def fixed_micro_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Micro-batches of ``micro_batch_size`` samples (the last may hold fewer), grouped by length so
    that each pads to a similar length.

    Returns:
        ``[micro_batch][k]``: sample indices.
    """
    by_length = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [sorted(by_length[start : start + micro_batch_size]) for start in range(0, len(by_length), micro_batch_size)]


def padded_tokens(micro_batch: Sequence[int], lengths: Sequence[int]) -> int:
    """What a micro-batch costs once padded to its longest sample: samples x longest length."""
    return len(micro_batch) * max((lengths[index] for index in micro_batch), default=0)


def _runs(order: list[int], lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Cut ``order`` (longest first) into consecutive runs whose padded tokens stay within ``cap``;
    each run's first sample is its longest, so a run grows while ``(size + 1) x first <= cap``."""
    runs: list[list[int]] = []
    for index in order:
        if runs and (len(runs[-1]) + 1) * lengths[runs[-1][0]] <= cap:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _split_heaviest(
    micro_batches: list[list[int]],
    lengths: Sequence[int],
    count: int,
    cost: Callable[[Sequence[int], Sequence[int]], int] = padded_tokens,
) -> list[list[int]]:
    """Halve the micro-batch of two samples or more with the highest ``cost`` (padded tokens unless
    told) until there are ``count`` (the halves keep neighbouring lengths together, and each costs
    at most the whole). ``count`` must not exceed the number of samples."""
    micro_batches = list(micro_batches)
    while len(micro_batches) < count:
        splittable = [position for position, indices in enumerate(micro_batches) if len(indices) > 1]
        position = max(splittable, key=lambda position: cost(micro_batches[position], lengths))
        indices = sorted(micro_batches.pop(position), key=lambda index: -lengths[index])
        middle = len(indices) // 2
        micro_batches += [indices[:middle], indices[middle:]]
    return micro_batches


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int, num_micro_batches: int | None = None) -> list[list[int]]:
    """Micro-batches of at most ``max_tokens`` tokens each *after padding* (samples x the longest
    sample's length, which is what the forward pass holds), balanced.

    Samples are sorted by length and cut into consecutive runs, so that each micro-batch pads to a
    length close to all of its samples'. The count is the fewest runs the budget allows, or
    ``num_micro_batches`` when that is more; the runs are then cut at the smallest cap that still
    gives no more than that many (which evens their padded sizes), and the heaviest halved until
    the count is reached.

    Args:
        lengths: tokens of each sample.
        max_tokens: the budget of one micro-batch (``train.max_tokens_per_micro_batch``).
        num_micro_batches: the count to reach (the largest any data-parallel rank needs); at most
            ``len(lengths)``, so that no micro-batch is empty.

    Returns:
        ``[micro_batch][k]``: sample indices, ascending within a micro-batch; none empty.

    Raises:
        ValueError: a sample longer than ``max_tokens`` (config validation keeps a full-length
            sequence within the budget, so this is a caller's bug), or ``num_micro_batches`` above
            the number of samples.
    """
    too_long = [index for index, length in enumerate(lengths) if length > max_tokens]
    if too_long:
        raise ValueError(
            f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the micro-batch budget {max_tokens}: "
            f"raise train.max_tokens_per_micro_batch to at least data.max_prompt_length + data.max_response_length"
        )
    if num_micro_batches is not None and num_micro_batches > len(lengths):
        raise ValueError(f"cannot fill {num_micro_batches} micro-batches from {len(lengths)} samples without empty ones")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    count = max(len(_runs(order, lengths, max_tokens)), num_micro_batches or 0)
    # The smallest cap whose runs number at most `count` (fewer runs as the cap grows).
    low, high = max(lengths, default=0), max_tokens
    while low < high:
        middle = (low + high) // 2
        if len(_runs(order, lengths, middle)) <= count:
            high = middle
        else:
            low = middle + 1
    micro_batches = _split_heaviest(_runs(order, lengths, high), lengths, count)
    return [sorted(indices) for indices in micro_batches]


def _check_packable(lengths: Sequence[int], budget: int, sample_multiple: int, pack_multiple: int) -> None:
    """Raise unless every sample fits a pack of ``budget`` tokens on its own, alignment included."""
    for index, length in enumerate(lengths):
        tokens = packed_tokens([index], lengths, sample_multiple=sample_multiple, pack_multiple=pack_multiple)
        if tokens > budget:
            raise ValueError(
                f"sample {index} has {length} tokens, {tokens} once packed (each sample rounded up to a multiple of "
                f"{sample_multiple}, the pack to {pack_multiple}), more than train.max_tokens_per_micro_batch ({budget}): "
                f"raise train.max_tokens_per_micro_batch to at least {tokens}"
            )


def _balanced_budget_packs(rank_weights: list[list[int]], budget: int, pack_multiple: int, count_multiple: int) -> list[list[list[int]]]:
    """Every rank's samples (by aligned tokens) in the same number of packs of at most ``budget``
    tokens after the tail: the count starts at the most any rank's tokens need, each rank
    partitions by :func:`karmarkar_karp`, and the count grows while any pack overflows.

    It stops by the rank's sample count at the latest (one sample per pack, and every sample fits
    alone); a rank that cannot fill the count keeps no empty pack because the ranks hold the same
    number of samples. The count is kept a multiple of ``count_multiple`` (:func:`_round_count`)."""
    usable = budget // pack_multiple * pack_multiple
    samples = len(rank_weights[0])
    count = _round_count(max(1, *(-(-sum(weights) // usable) for weights in rank_weights)), count_multiple, samples)
    while True:
        local_plans = [karmarkar_karp(weights, count) for weights in rank_weights]
        packs = [(pack, weights) for weights, plan in zip(rank_weights, local_plans) for pack in plan]
        if count == samples or all(packed_tokens(pack, weights, pack_multiple=pack_multiple) <= budget for pack, weights in packs):
            return local_plans
        count = _round_count(count + 1, count_multiple, samples)


def _round_count(count: int, multiple: int, samples: int) -> int:
    """A rank's micro-batch count rounded up to a multiple of ``multiple`` (Megatron's interleaved
    schedule wants whole groups of pipeline-size micro-batches), but no more than its ``samples``:
    no micro-batch may be empty."""
    return min(-(-count // multiple) * multiple, samples)


def _balanced_fixed_packs(weights: list[int], micro_batch_size: int, count_multiple: int) -> list[list[int]]:
    """``ceil(n / micro_batch_size)`` packs (rounded by :func:`_round_count`) of at most
    ``micro_batch_size`` samples, balanced by tokens: equal-size :func:`karmarkar_karp` over the
    samples and as many zero-token stand-ins as make the count divide them, which are then dropped
    (fewer than one per pack and group of packs, so no pack is left empty)."""
    count = _round_count(-(-len(weights) // micro_batch_size), count_multiple, len(weights))
    stand_ins = -(-len(weights) // count) * count - len(weights)
    packs = karmarkar_karp([*weights, *([0] * stand_ins)], count, equal_size=True)
    return [[index for index in pack if index < len(weights)] for pack in packs]


def _greedy_packs(weights: list[int], budget: int, pack_multiple: int) -> list[list[int]]:
    """Longest first, each sample joins the open pack while that keeps the budget, else opens the
    next one (next fit)."""
    packs: list[list[int]] = []
    tokens = 0
    for index in sorted(range(len(weights)), key=lambda index: (-weights[index], index)):
        if packs and aligned_length(tokens + weights[index], pack_multiple) <= budget:
            packs[-1].append(index)
            tokens += weights[index]
        else:
            packs.append([index])
            tokens = weights[index]
    return packs


def _heaviest_first(packs: list[list[int]], weights: Sequence[int], linear_cost: float) -> list[list[int]]:
    """``packs`` by the second balance key, ``L x (linear_cost + L)`` summed over a pack's samples,
    heaviest first (equal costs: the pack with the lowest index first)."""
    return sorted(packs, key=lambda pack: (-sum(weights[index] * (linear_cost + weights[index]) for index in pack), min(pack)))


def plan_micro_batches(
    lengths: Sequence[int],
    data_parallel_size: int,
    train: TrainConfig,
    *,
    packing: bool = False,
    balanced: bool = True,
    sample_multiple: int = 1,
    pack_multiple: int = 1,
    linear_cost: float = 0.0,
    count_multiple: int = 1,
) -> list[list[list[int]]]:
    """Split one mini-batch over the data-parallel ranks and into micro-batches on each, every rank
    with the same number of micro-batches.

    Padded (``packing=False``): the same sample count on every rank (:func:`split_across_ranks`),
    then :func:`token_budget_micro_batches` or :func:`fixed_micro_batches`.

    Packed (``packing=True``), balanced: the ranks' samples by :func:`karmarkar_karp` on aligned
    tokens (equal counts), each rank's packs by :func:`karmarkar_karp` into the fewest that keep
    the budget on every rank (or into ``ceil(samples / micro_batch_size)`` packs of at most
    ``micro_batch_size`` samples), ordered heaviest first by ``L x (linear_cost + L)`` (see the
    module docstring). Packed, not balanced: :func:`split_across_ranks`, then packs filled longest
    first up to the budget (next fit; or :func:`fixed_micro_batches`), the ranks that need fewer
    halving their largest until the counts agree.

    Args:
        lengths: tokens (prompt + response) of each sample of the mini-batch.
        data_parallel_size: the number of data-parallel ranks; it must divide ``len(lengths)``.
        train: ``train.dynamic_batch`` picks token-budget micro-batches of
            ``train.max_tokens_per_micro_batch`` tokens (padded: samples x the longest; packed:
            :func:`packed_tokens`), else ``train.micro_batch_size`` samples (at most, packed).
        packing: plan packed micro-batches; the arguments below apply only to them.
        balanced: balance by Karmarkar-Karp, else fill greedily (to compare against).
        sample_multiple: each sample's tokens are rounded up to a multiple of this.
        pack_multiple: each pack's tokens are rounded up to a multiple of this (its tail).
        linear_cost: the linear layers' cost per token in units of the causal attention's per pair
            of tokens (``4h + 3f`` for a dense layer, see the module docstring), for the order of
            the packs; 0 orders them by ``sum(L**2)``.
        count_multiple: every rank's micro-batch count is rounded up to a multiple of this (the
            pipeline size under virtual pipelining: Megatron's interleaved schedule runs
            micro-batches in groups of that many), while the rank's samples allow; the extra
            micro-batches come from halving the heaviest (padded, greedy) or from a partition into
            more parts (balanced).

    Returns:
        ``plan[rank][micro_batch]``: indices into ``lengths``, ascending within a micro-batch;
        every sample appears exactly once, ``len(plan[rank])`` is the same for every rank, and no
        micro-batch is empty.

    Raises:
        ValueError: ``data_parallel_size`` does not divide the sample count; packed, a sample that
            does not fit ``train.max_tokens_per_micro_batch`` alone, or a multiple below 1.
    """
    if not packing:
        ranks = split_across_ranks(lengths, data_parallel_size)
        rank_lengths = [[lengths[index] for index in indices] for indices in ranks]
        samples = len(lengths) // data_parallel_size
        if train.dynamic_batch:
            budget = train.max_tokens_per_micro_batch
            count = _round_count(max(len(token_budget_micro_batches(local, budget)) for local in rank_lengths), count_multiple, samples)
            local_plans = [token_budget_micro_batches(local, budget, count) for local in rank_lengths]
        else:
            local_plans = [fixed_micro_batches(local, train.micro_batch_size) for local in rank_lengths]
            count = _round_count(max(map(len, local_plans), default=0), count_multiple, samples)
            local_plans = [_split_heaviest(plan, local, count) for local, plan in zip(rank_lengths, local_plans)]
        return [[[indices[k] for k in micro] for micro in plan] for indices, plan in zip(ranks, local_plans)]

    if min(sample_multiple, pack_multiple) < 1:
        raise ValueError(f"sample_multiple ({sample_multiple}) and pack_multiple ({pack_multiple}) must be at least 1")
    if linear_cost < 0:
        raise ValueError(f"linear_cost ({linear_cost}) must be at least 0")
    aligned = [aligned_length(length, sample_multiple) for length in lengths]
    budget = train.max_tokens_per_micro_batch
    if train.dynamic_batch:
        _check_packable(lengths, budget, sample_multiple, pack_multiple)
    if len(lengths) % data_parallel_size:
        raise ValueError(f"{len(lengths)} samples cannot be split evenly over {data_parallel_size} data-parallel ranks")
    if balanced:
        ranks = karmarkar_karp(aligned, data_parallel_size, equal_size=True)
    else:
        ranks = split_across_ranks(aligned, data_parallel_size)
    rank_weights = [[aligned[index] for index in indices] for indices in ranks]
    if not lengths:
        local_plans: list[list[list[int]]] = [[] for _ in ranks]
    elif not train.dynamic_batch:
        if balanced:
            local_plans = [_balanced_fixed_packs(weights, train.micro_batch_size, count_multiple) for weights in rank_weights]
        else:
            local_plans = [fixed_micro_batches(weights, train.micro_batch_size) for weights in rank_weights]
            count = _round_count(max(map(len, local_plans)), count_multiple, len(rank_weights[0]))
            local_plans = [_split_heaviest(plan, weights, count) for weights, plan in zip(rank_weights, local_plans)]
    elif balanced:
        local_plans = _balanced_budget_packs(rank_weights, budget, pack_multiple, count_multiple)
    else:
        local_plans = [_greedy_packs(weights, budget, pack_multiple) for weights in rank_weights]
        count = _round_count(max(len(plan) for plan in local_plans), count_multiple, len(rank_weights[0]))
        cost = functools.partial(packed_tokens, pack_multiple=pack_multiple)
        local_plans = [_split_heaviest(plan, weights, count, cost) for weights, plan in zip(rank_weights, local_plans)]
    if balanced:
        local_plans = [_heaviest_first(plan, weights, linear_cost) for weights, plan in zip(rank_weights, local_plans)]
    return [[sorted(indices[k] for k in pack) for pack in plan] for indices, plan in zip(ranks, local_plans)]
