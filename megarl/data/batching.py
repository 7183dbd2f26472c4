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


def _split_heaviest(micro_batches: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Halve the micro-batch of two samples or more with the most padded tokens until there are
    ``count`` (the halves keep neighbouring lengths together, and each costs at most the whole).
    ``count`` must not exceed the number of samples."""
    micro_batches = list(micro_batches)
    while len(micro_batches) < count:
        splittable = [position for position, indices in enumerate(micro_batches) if len(indices) > 1]
        position = max(splittable, key=lambda position: padded_tokens(micro_batches[position], lengths))
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
