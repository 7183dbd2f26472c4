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

:func:`plan_micro_batches` does this from the whole mini-batch; a rank that holds only its own
samples gets the same result with an all-reduce::

    count = torch.tensor(len(token_budget_micro_batches(lengths, budget)))
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=data_parallel_group)
    micro_batches = token_budget_micro_batches(lengths, budget, num_micro_batches=int(count))
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

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


def fixed_micro_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Micro-batches of ``micro_batch_size`` samples (the last may hold fewer), grouped by length so
    that each pads to a similar length.

    Returns:
        ``[micro_batch][k]``: sample indices.
    """
    by_length = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [sorted(by_length[start : start + micro_batch_size]) for start in range(0, len(by_length), micro_batch_size)]


def _first_fit(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: each sample, longest first, into the first micro-batch it fits in."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in order:
        target = next((position for position, load in enumerate(loads) if load + lengths[index] <= max_tokens), len(bins))
        if target == len(bins):
            bins.append([])
            loads.append(0)
        bins[target].append(index)
        loads[target] += lengths[index]
    return bins


def _spread(order: list[int], lengths: Sequence[int], count: int) -> tuple[list[list[int]], int]:
    """Longest-processing-time: each sample, longest first, into the lightest of ``count`` micro-batches.

    Returns:
        The micro-batches and the heaviest one's tokens.
    """
    heap = [(0, position) for position in range(count)]
    bins: list[list[int]] = [[] for _ in range(count)]
    for index in order:
        load, position = heapq.heappop(heap)
        bins[position].append(index)
        heapq.heappush(heap, (load + lengths[index], position))
    return bins, max((load for load, _ in heap), default=0)


def _split_heaviest(micro_batches: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Halve the heaviest micro-batch of two samples or more until there are ``count``; halves stay
    within any budget the whole kept. ``count`` must not exceed the number of samples."""
    micro_batches = list(micro_batches)
    while len(micro_batches) < count:
        splittable = [position for position, indices in enumerate(micro_batches) if len(indices) > 1]
        position = max(splittable, key=lambda position: sum(lengths[index] for index in micro_batches[position]))
        indices = sorted(micro_batches.pop(position), key=lambda index: -lengths[index])
        micro_batches += [indices[0::2], indices[1::2]]
    return micro_batches


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int, num_micro_batches: int | None = None) -> list[list[int]]:
    """Micro-batches of at most ``max_tokens`` tokens each, balanced.

    The count is the fewest that first-fit decreasing packs into, or ``num_micro_batches`` when that
    is more. The samples are then spread longest first over that many micro-batches, always onto the
    lightest, which balances them. When that breaks the budget (it can at the first-fit count:
    ``[5, 5, 4, 3, 3]`` in 10 spreads to ``[5, 4] [5, 3, 3]``), the first-fit packing is kept, its
    heaviest micro-batches halved until the count is reached. (Above the first-fit count an
    exhaustive check of up to 9 samples found no spread that breaks the budget; the halving keeps
    the guarantee regardless.)

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
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    packed = _first_fit(order, lengths, max_tokens)
    count = max(len(packed), num_micro_batches or 0)
    spread, heaviest = _spread(order, lengths, count)
    chosen = spread if heaviest <= max_tokens else _split_heaviest(packed, lengths, count)
    return [sorted(indices) for indices in chosen]


def plan_micro_batches(lengths: Sequence[int], data_parallel_size: int, train: TrainConfig) -> list[list[list[int]]]:
    """Split one mini-batch over the data-parallel ranks and into micro-batches on each, every rank
    with the same number of micro-batches.

    Args:
        lengths: tokens (prompt + response) of each sample of the mini-batch.
        data_parallel_size: the number of data-parallel ranks; it must divide ``len(lengths)``.
        train: ``train.dynamic_batch`` picks token-budget micro-batches of
            ``train.max_tokens_per_micro_batch`` tokens, else ``train.micro_batch_size`` samples.

    Returns:
        ``plan[rank][micro_batch]``: indices into ``lengths``; every sample appears exactly once and
        ``len(plan[rank])`` is the same for every rank.
    """
    ranks = split_across_ranks(lengths, data_parallel_size)
    rank_lengths = [[lengths[index] for index in indices] for indices in ranks]
    if train.dynamic_batch:
        budget = train.max_tokens_per_micro_batch
        count = max(len(token_budget_micro_batches(local, budget)) for local in rank_lengths)
        local_plans = [token_budget_micro_batches(local, budget, count) for local in rank_lengths]
    else:
        local_plans = [fixed_micro_batches(local, train.micro_batch_size) for local in rank_lengths]
    return [[[indices[k] for k in micro] for micro in plan] for indices, plan in zip(ranks, local_plans)]
