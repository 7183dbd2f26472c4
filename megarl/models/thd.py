"""Where the samples of a packed (THD) micro-batch lie: the bounds Megatron passes in
``PackedSeqParams``, each context-parallel rank's tokens, the all-gather that puts every rank's
tokens back in pack order, and the groups of samples :class:`~megarl.models.portable.PortableAttention`
attends to in one call.

A pack is samples back to back, sample ``i`` at tokens ``bounds[i]:bounds[i+1]``. Under context
parallelism every sample's length is a multiple of ``2 * CP`` and rank ``r`` holds, sample after
sample, the sample's chunks ``r`` and ``2*CP-1-r`` (Transformer Engine's
``thd_get_partitioned_indices`` layout, which Megatron's THD rotary embedding assumes).

Without context parallelism the samples are attended in *length groups*: samples of similar
length (within ``GROUP_LENGTH_RATIO`` of the group's longest) are gathered into one padded
``[n, heads, longest, d]`` batch and attended in one causal call. Causal attention never lets a
sample's tokens see the padding that follows them, so the result is exact; the groups cost at most
``1 / GROUP_LENGTH_RATIO**2`` of the samples' own attention and take a few calls where one call per
sample would take hundreds of small ones (the main job's 32-sample packs: 5 calls instead of 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

GROUP_LENGTH_RATIO = 0.8
"""A sample joins a length group while it is at least this fraction of the group's longest."""


def _check_bounds(bounds: list[int], cp_size: int) -> None:
    """Raise ValueError unless ``bounds`` are packed sample bounds that CP can split (see
    :func:`packed_positions`)."""
    if not bounds or bounds[0] != 0:
        raise ValueError(f"packed sample bounds must start at 0, got {bounds[:4]}")
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end < start:
            raise ValueError(
                f"packed sample bounds must not decrease: bounds[{index}] = {start} > "
                f"bounds[{index + 1}] = {end}"
            )
        if cp_size > 1 and (end - start) % (2 * cp_size):
            raise ValueError(
                f"packed sample {index} (tokens {start}:{end}) has length {end - start}, not a "
                f"multiple of 2 * context parallel size ({2 * cp_size}): pad each sample to that "
                f"multiple"
            )


def packed_positions(
    bounds: list[int], cp_rank: int, cp_size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global index in the pack of each token that CP rank ``cp_rank`` holds.

    Returns ``[bounds[-1] / cp_size]`` int64, in the order the rank holds its tokens.

    Sample ``i`` is tokens ``bounds[i]:bounds[i+1]`` of the whole pack. Under context parallelism
    every sample's length is a multiple of ``2 * cp_size``; rank ``r`` holds, sample after sample,
    the sample's chunks ``r`` and ``2*cp_size-1-r`` of ``2*cp_size`` (Transformer Engine's
    ``thd_get_partitioned_indices`` layout, which Megatron's THD rotary embedding assumes), so each
    rank's causal attention work is balanced. ``cp_size == 1`` gives ``arange(bounds[-1])``.

    Args:
        bounds: sample boundaries of the whole pack, ``[n + 1]``, from 0 to the pack length.
        cp_rank: the context-parallel rank whose tokens to locate.
        cp_size: the context-parallel group size.
        device: where to build the result (``None``: the CPU).

    Raises:
        ValueError: ``bounds`` does not start at 0, decreases, or has a sample whose length is not
            a multiple of ``2 * cp_size``.
    """
    _check_bounds(bounds, cp_size)
    if cp_size == 1:
        return torch.arange(bounds[-1], device=device)
    pieces = [torch.zeros(0, dtype=torch.long, device=device)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * cp_size)
        first = start + cp_rank * chunk
        second = start + (2 * cp_size - 1 - cp_rank) * chunk
        pieces += [
            torch.arange(first, first + chunk, device=device),
            torch.arange(second, second + chunk, device=device),
        ]
    return torch.cat(pieces)


def context_parallel_order(
    bounds: list[int], cp_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[bounds[-1]]``: the global index in the pack of each row of the rank-major all-gather of
    every CP rank's tokens (see :func:`packed_positions`)."""
    return torch.cat(
        [packed_positions(bounds, rank, cp_size, device=device) for rank in range(cp_size)]
    )


class _GatherContextParallel(torch.autograd.Function):
    """All-gather every CP rank's ``[t/cp, ...]`` rows into the whole ``[t, ...]``, each row at its
    global index (``order``, from :func:`context_parallel_order`).

    The backward reduce-scatters the gradient: every rank's K/V are read by the queries of all
    ranks, so each rank's gradient is the sum of what every rank's attention sends back.
    """

    @staticmethod
    def forward(
        ctx, local: torch.Tensor, group: dist.ProcessGroup, order: torch.Tensor
    ) -> torch.Tensor:
        ctx.group = group
        ctx.order = order
        local = local.contiguous()
        gathered = torch.empty(
            (group.size() * local.shape[0], *local.shape[1:]),
            dtype=local.dtype,
            device=local.device,
        )
        dist.all_gather_into_tensor(gathered, local, group=group)
        full = torch.empty_like(gathered)
        full[order] = gathered
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        rank_major = grad_full[ctx.order].contiguous()
        grad_local = torch.empty(
            (rank_major.shape[0] // ctx.group.size(), *rank_major.shape[1:]),
            dtype=rank_major.dtype,
            device=rank_major.device,
        )
        dist.reduce_scatter_tensor(grad_local, rank_major, group=ctx.group)
        return grad_local, None, None


def gather_context_parallel(
    local: torch.Tensor, group: dist.ProcessGroup, order: torch.Tensor
) -> torch.Tensor:
    """``local: [t/cp, ...]`` (this CP rank's rows) -> ``[t, ...]`` in pack order; ``order``:
    :func:`context_parallel_order` of the pack, on ``local``'s device."""
    return _GatherContextParallel.apply(local, group, order)


HOST_BOUNDS_ATTRIBUTE = "megarl_host_bounds"
"""A ``PackedSeqParams`` may carry its bounds as a python list under this name (the trainer has them
on the host): :func:`packed_layout` then reads nothing back from the device."""

_LAYOUT_ATTRIBUTE = "_megarl_packed_layout"
"""Where :func:`packed_layout` caches a ``PackedSeqParams``'s :class:`PackedLayout`."""


@dataclass(frozen=True)
class LengthGroup:
    """Samples of similar length attended in one call (see the module docstring)."""

    count: int
    """Samples in the group."""
    length: int
    """The longest of them: each is padded to it."""
    gather: torch.Tensor
    """``[count * length]`` the pack token each padded position takes (its sample's; the padding
    repeats the sample's first token, never read by a real token)."""
    kept: torch.Tensor
    """The padded positions that hold real tokens, in pack order within the group."""


@dataclass(frozen=True)
class PackedLayout:
    """Where the samples of one packed (THD) micro-batch lie, for one CP rank."""

    cp_rank: int
    cp_size: int
    device: torch.device
    bounds: list[int]
    """Global sample bounds ``[n + 1]`` of the whole pack."""
    local_bounds: list[int]
    """This rank's rows of each sample: ``bounds / cp_size``."""
    gather_order: torch.Tensor | None
    """``[t]`` :func:`context_parallel_order` of the pack; None without CP."""
    allowed: list[torch.Tensor] | None
    """Per sample ``[L_i / cp, L_i]`` bool, True where a key's position is at most the query's
    (causal within the sample, queries in the chunk layout); None without CP (``is_causal``)."""
    groups: list[LengthGroup] | None
    """Without CP: the length groups, longest first; None with CP (one call per sample)."""
    restore: torch.Tensor | None
    """Without CP: ``[t]`` where each pack token's result lies in the groups' results, concatenated."""


def packed_layout(params, cp_rank: int, cp_size: int, device: torch.device) -> PackedLayout:
    """The :class:`PackedLayout` of ``params`` (a ``PackedSeqParams``), built on first use and
    cached on ``params``: every layer of the micro-batch reads the same bounds, and reading them
    from the device tensor (``.tolist()``) is a host sync."""
    cached = getattr(params, _LAYOUT_ATTRIBUTE, None)
    wanted = (cp_rank, cp_size, device)
    if cached is not None and (cached.cp_rank, cached.cp_size, cached.device) == wanted:
        return cached
    # As Megatron's THD rotary embedding: the padded bounds when given.
    padded_q, padded_kv = params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded
    bounds_q = padded_q if padded_q is not None else params.cu_seqlens_q
    bounds_kv = padded_kv if padded_kv is not None else params.cu_seqlens_kv
    if bounds_q is None:
        raise ValueError("THD attention needs PackedSeqParams.cu_seqlens_q_padded or cu_seqlens_q")
    bounds = getattr(params, HOST_BOUNDS_ATTRIBUTE, None) or bounds_q.tolist()
    if bounds_kv is not None and bounds_kv is not bounds_q and bounds_kv.tolist() != bounds:
        raise ValueError(
            "PortableAttention is self-attention: PackedSeqParams' key bounds "
            "(cu_seqlens_kv[_padded]) must equal its query bounds (cu_seqlens_q[_padded])"
        )
    _check_bounds(bounds, cp_size)
    gather_order = allowed = groups = restore = None
    if cp_size == 1:
        groups, restore = _length_groups(bounds, device)
    else:
        gather_order = context_parallel_order(bounds, cp_size, device=device)
        allowed = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            query_positions = packed_positions([0, end - start], cp_rank, cp_size, device=device)
            key_positions = torch.arange(end - start, device=device)
            allowed.append(key_positions[None, :] <= query_positions[:, None])
    layout = PackedLayout(
        cp_rank=cp_rank,
        cp_size=cp_size,
        device=device,
        bounds=bounds,
        local_bounds=[bound // cp_size for bound in bounds],
        gather_order=gather_order,
        allowed=allowed,
        groups=groups,
        restore=restore,
    )
    setattr(params, _LAYOUT_ATTRIBUTE, layout)
    return layout


def _length_groups(bounds: list[int], device: torch.device) -> tuple[list[LengthGroup], torch.Tensor]:
    """The length groups of a pack's samples (longest first) and the ``restore`` index of
    :class:`PackedLayout`."""
    samples = sorted(
        (index for index in range(len(bounds) - 1) if bounds[index + 1] > bounds[index]),
        key=lambda index: (bounds[index] - bounds[index + 1], index),
    )
    members: list[list[int]] = []
    for index in samples:
        if members and bounds[index + 1] - bounds[index] >= GROUP_LENGTH_RATIO * (bounds[members[-1][0] + 1] - bounds[members[-1][0]]):
            members[-1].append(index)
        else:
            members.append([index])
    groups, order = [], []
    for group in members:
        length = bounds[group[0] + 1] - bounds[group[0]]
        starts = torch.tensor([bounds[index] for index in group])
        lengths = torch.tensor([bounds[index + 1] - bounds[index] for index in group])
        offsets = torch.arange(length)
        real = offsets[None, :] < lengths[:, None]
        gather = starts[:, None] + torch.where(real, offsets[None, :], 0)
        kept = real.flatten().nonzero().squeeze(1)
        groups.append(LengthGroup(count=len(group), length=length, gather=gather.flatten().to(device), kept=kept.to(device)))
        order.append(gather.flatten()[kept])
    restore = torch.argsort(torch.cat(order)) if order else torch.zeros(0, dtype=torch.long)
    return groups, restore.to(device)
