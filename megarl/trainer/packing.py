"""Packed micro-batches: a micro-batch's samples concatenated without padding, one sequence with
per-sample bounds (THD), for ``train.packing``.

A padded micro-batch (:meth:`TrainBatch.micro_batch`) is ``[b, s]``: every row padded to the
longest. A packed one is ``[1, T]``: the rows' tokens back to back, each sample rounded up only to
the layout's *sample multiple* (2 x CP with context parallelism, so that every sample splits into
the 2 x CP load-balanced chunks), and the pack to its *pack multiple* (also CP x TP under
sequence parallelism) by a tail of its own (segments no longer than the longest sample). Megatron gets the bounds as
``PackedSeqParams(qkv_format="thd")``: attention stays within a sample (Transformer Engine's THD
attention, or megarl's portable attention) and rotary positions restart at every bound. With
context parallelism each rank keeps chunks ``r`` and ``2 CP - 1 - r`` of every sample
(:func:`megarl.models.thd.packed_positions`, the layout Megatron's THD rotary embedding uses).

Labels are taken per row in label space (token ``t + 1`` of the same row), never by shifting the
packed stream, so no sample predicts its neighbour's first token.

Two views. The model sees the pack (``tokens``, ``position_ids``, ``labels``, the routing inputs:
``[1, T_local]``). The losses see the micro-batch's rows as a grid ``[b, s]`` (``s`` the rows'
longest sequence, all columns), in which ``response_mask`` is true only at the tokens this rank
holds: :func:`to_grid` puts per-token results of the pack into the grid, so every loss, every
aggregation mode and every metric reads what it reads from a padded micro-batch. Log-probs and
entropy (the output projection) are computed on the packed tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megarl.config import layout_multiple
from megarl.data.batching import aligned_length, packed_tokens
from megarl.models.thd import packed_positions
from megarl.trainer.batch import TrainBatch


def pack_multiples(tensor_parallel: int, sequence_parallel: bool, context_parallel: int) -> tuple[int, int]:
    """``(sample_multiple, pack_multiple)`` of a layout: every sample rounds up to the first (2 x CP
    with context parallelism, so that each splits into 2 x CP chunks), the pack to the second
    (:func:`megarl.config.layout_multiple`, a multiple of the first)."""
    return 2 * context_parallel if context_parallel > 1 else 1, layout_multiple(tensor_parallel, sequence_parallel, context_parallel)


def pack_bounds(lengths: Sequence[int], sample_multiple: int, pack_multiple: int, length: int | None = None) -> list[int]:
    """The global bounds (``cu_seqlens``) of a pack of samples of ``lengths`` tokens: each rounded up
    to ``sample_multiple``, then a tail up to the next multiple of ``pack_multiple`` (or up to
    ``length``, a common pack length) when one is needed, in segments no longer than the longest
    sample (a long tail, under virtual pipelining, would otherwise cost attention of its own
    length squared).

    Raises:
        ValueError: ``length`` is shorter than the pack or not a multiple of ``pack_multiple``.
    """
    bounds = [0]
    for sample_length in lengths:
        bounds.append(bounds[-1] + aligned_length(sample_length, sample_multiple))
    # The planner's measure of a pack (its budget counts it), so the two cannot disagree.
    total = packed_tokens(range(len(lengths)), lengths, sample_multiple=sample_multiple, pack_multiple=pack_multiple) if length is None else length
    if total < bounds[-1] or total % pack_multiple:
        raise ValueError(f"a pack of {bounds[-1]} tokens cannot be padded to {total} (a multiple of {pack_multiple} at least as long)")
    longest = max((end - start for start, end in zip(bounds[:-1], bounds[1:])), default=sample_multiple)
    while total > bounds[-1]:
        bounds.append(min(total, bounds[-1] + longest))
    return bounds


def packed_micro_batch(
    batch: TrainBatch,
    rows: Sequence[int],
    fields: Sequence[str],
    *,
    sample_multiple: int,
    pack_multiple: int,
    cp_rank: int = 0,
    cp_size: int = 1,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The packed micro-batch of ``rows`` on this context-parallel rank.

    Args:
        batch: the step's samples.
        rows: the batch rows to pack, in order.
        fields: the token values to carry (grid view).
        sample_multiple, pack_multiple: from :func:`pack_multiples`.
        cp_rank, cp_size: this rank in the context-parallel group.
        length: pad the pack to this many tokens (a common length for every micro-batch of a pass);
            None: the pack's own length.

    Returns:
        The model's view, ``[1, T_local]``: ``tokens``, ``position_ids`` (position within the
        sample), ``labels``; ``cu_seqlens [n + 1]`` (int32, global bounds: each sample's, then the
        tail's) and ``max_seqlen`` (0-d, the longest segment); ``token_rows``/``token_columns``
        (where each token sits in the batch, -1 on the tail), ``token_valid`` (a real token) and,
        with routing replay, ``routed_experts [1, T_local, L, k]`` and ``token_routed`` (routed by
        the engine). The losses' grid, ``[b, s]``: ``response_mask`` (this rank's tokens only) and
        each of ``fields``; ``rows [b]``, ``columns [s]``, ``response_lengths``,
        ``sequence_lengths``; and ``token_kept``/``token_slots``, the pack tokens that land in
        the grid and their flat grid index (:func:`to_grid`).
    """
    if batch.pad_multiple % sample_multiple:
        raise ValueError(
            f"the batch's columns are a multiple of {batch.pad_multiple}, not of the sample multiple {sample_multiple}: "
            f"build it with pad_multiple=megarl.config.layout_multiple(...) of the layout it trains under"
        )
    rows_tensor = torch.as_tensor(list(rows), dtype=torch.int64)
    sequence_lengths = batch.sequence_lengths[rows_tensor]
    lengths = sequence_lengths.tolist()
    bounds = pack_bounds(lengths, sample_multiple, pack_multiple, length)
    total = bounds[-1]
    # Every pack position's batch row and column; the tail (past the samples) has none.
    width = batch.micro_batch_length(rows_tensor)
    # The samples' segments (the rest of the bounds is the tail).
    aligned = torch.tensor(bounds[: len(lengths) + 1], dtype=torch.int64).diff()
    starts = torch.tensor(bounds[: len(lengths)], dtype=torch.int64)
    tail = torch.full((total - int(aligned.sum()),), -1, dtype=torch.int64)
    token_rows = torch.cat([rows_tensor.repeat_interleave(aligned), tail])
    columns = torch.arange(int(aligned.sum())) - starts.repeat_interleave(aligned)
    token_columns = torch.cat([columns, tail])
    slots = torch.cat([(torch.arange(len(lengths)) * width).repeat_interleave(aligned) + columns, tail])
    local = packed_positions(bounds, cp_rank, cp_size)
    token_rows, token_columns, slots = token_rows[local], token_columns[local], slots[local]
    real = token_rows >= 0
    at_rows, at_columns = token_rows.clamp(min=0), token_columns.clamp(min=0)
    next_columns = (at_columns + 1).clamp(max=batch.tokens.shape[1] - 1)
    # The tail holds token 0 (any id of the vocabulary: nothing reads its results).
    tokens = torch.where(real, batch.tokens[at_rows, at_columns], 0)
    labels = torch.where(real, batch.tokens[at_rows, next_columns], 0)
    positions = torch.where(real, at_columns, 0)
    valid = real & (at_columns < batch.sequence_lengths[at_rows])

    # The grid: the rows' whole width; this rank's tokens are the ones it scores.
    grid_rows = len(lengths)
    owned = torch.zeros(grid_rows * width, dtype=torch.bool)
    kept = real.nonzero().squeeze(1)
    owned[slots[kept]] = True
    micro = {
        "tokens": tokens[None],
        "position_ids": positions[None],
        "labels": labels[None],
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": torch.tensor(max(end - start for start, end in zip(bounds[:-1], bounds[1:]))),
        "token_rows": token_rows[None],
        "token_columns": token_columns[None],
        "token_valid": valid[None],
        "token_kept": kept,
        "token_slots": slots[kept],
        "response_mask": batch.response_mask[rows_tensor, :width] & owned.view(grid_rows, width),
        "rows": rows_tensor,
        "columns": torch.arange(width),
        "response_lengths": batch.response_lengths[rows_tensor],
        "sequence_lengths": sequence_lengths,
    }
    for name in fields:
        micro[name] = batch.token_values[name][rows_tensor, :width]
    if batch.routed_experts is not None:
        routed_lengths = batch.sequence_lengths if batch.routed_lengths is None else batch.routed_lengths
        # The tail takes the first row's experts column by column: nothing reads its results, and
        # real routing loads the experts as real tokens do (capacity, expert-bias counts).
        tail_columns = torch.arange(local.shape[0]) % batch.tokens.shape[1]
        experts = torch.where(real[:, None, None], batch.routed_experts[at_rows, at_columns], batch.routed_experts[rows_tensor[0], tail_columns])
        micro["routed_experts"] = experts[None]
        micro["token_routed"] = (valid & (at_columns < routed_lengths[at_rows]))[None]
    return micro


def to_grid(micro: dict[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """Per-token results of the model's view of ``micro`` (``[1, T_local, ...]``) in the losses'
    grid ``[b, s, ...]`` (zeros where this rank holds no token); differentiable. A padded
    micro-batch's two views are the same: its values come back as they are."""
    if "token_slots" not in micro:
        return values
    grid_rows, width = micro["rows"].shape[0], micro["columns"].shape[0]
    grid = values.new_zeros((grid_rows * width, *values.shape[2:]))
    grid = grid.index_put((micro["token_slots"],), values[0, micro["token_kept"]])
    return grid.view(grid_rows, width, *values.shape[2:])

