"""Planning the weight stream: Megatron parameters -> HF tensors in buckets -> copy plans.

Everything here is pure bookkeeping over shapes, run once when the stream is built; each training
step then only executes the plans (:func:`megarl.weights.copy_plan.execute_copy_plan`).

The inputs are the whole model's parameters as :class:`ParameterLayout` (a mapping rule plus the
shape of its tensor-parallel shards), which rank sends each shard, and which shards this rank holds.
The mapping rules' :meth:`~megarl.models.mapping.Rule.segments` say which HF slices form each shard,
so one shard becomes a handful of 2-D block copies: a fused QKV shard, one copy per query group and
projection; a gate/up shard, two; a row-parallel shard, one copy of ``rows`` strided rows; vocab
padding, none.

Each bucket is planned for every rank's role in it:

- the destination rank copies into the bucket, reading the shards it holds in place and the others
  from a staging buffer into which their senders' messages arrive;
- every other rank that sends shards packs them, cast to the stream's dtype (so a bf16 stream of
  fp32 weights sends half the bytes), into one message per bucket.

All ranks compute the same buckets and messages from the same inputs, so their sends and receives
match without further negotiation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch

from megarl.models.mapping import Rule
from megarl.weights.bucket import TensorMeta, pack_layout
from megarl.weights.copy_plan import PLAN_COLUMNS, dtype_code, empty_plan

MESSAGE_ALIGNMENT = 16
"""Each shard starts at a multiple of 16 bytes in a message, so the GPU engine moves it in 16-byte
words whatever the dtypes around it."""

ShardKey = tuple[int, int]
"""(index of a parameter in the layout list, its shard: the TP / ETP rank; 0 when replicated)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ParameterLayout:
    """One Megatron parameter of the whole model and how tensor parallelism splits it."""

    rule: Rule
    """Its mapping rule, with the layer and expert filled in."""
    shard_shape: tuple[int, ...]
    """The shape of every shard (of the local Megatron parameter)."""
    dtype: torch.dtype
    num_shards: int
    """The size of the TP group (ETP for experts) that splits it; 1 when the rule is replicated."""

    @property
    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)

    def hf_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(HF name, full shape)`` of each HF tensor the parameter holds, in rule order."""
        dim = self.rule.dim
        lengths = self.rule.hf_lengths(self.shard_shape[dim], self.num_shards)
        shapes = []
        for name in self.rule.hf:
            shape = list(self.shard_shape)
            shape[dim] = lengths[name]
            shapes.append((name, tuple(shape)))
        return shapes


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """The bytes one sender contributes to one bucket, as they land in the destination's staging."""

    sender: int
    """Global rank."""
    offset: int
    """First byte in the staging buffer."""
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class BucketPlan:
    """One bucket, and this rank's part in filling it.

    The plan's sources are ``[staging, *local tensors listed in local_tensors]``: source 0 is the
    staging buffer (used on the destination only), source ``1 + i`` is local tensor
    ``local_tensors[i]``.
    """

    metas: tuple[TensorMeta, ...]
    """The bucket's HF tensors in buffer order (the same on every rank)."""
    plan: torch.Tensor
    """This rank's copies, int64 ``[num_copies, PLAN_COLUMNS]``: into the bucket on the destination,
    into its message on a sender; empty on ranks with no part in the bucket."""
    local_tensors: tuple[int, ...]
    """Indices of the rank's local tensors that the plan reads."""
    out_bytes: int
    """Bytes the plan writes: the bucket's size on the destination, the message's on a sender."""
    messages: tuple[Message, ...]
    """The messages the destination receives for this bucket, by sender rank."""

    @property
    def nbytes(self) -> int:
        """The bucket's size."""
        return self.metas[-1].end if self.metas else 0

    @property
    def staging_bytes(self) -> int:
        return self.messages[-1].offset + self.messages[-1].nbytes if self.messages else 0


def unique_hf_tensors(layouts: Sequence[ParameterLayout]) -> list[ParameterLayout]:
    """Drop the parameters whose HF tensors all come earlier in the list: with tied embeddings the
    last pipeline stage's output layer maps to the embedding's HF tensor, which travels once."""
    kept, produced = [], set()
    for layout in layouts:
        names = set(layout.rule.hf)
        if names <= produced:
            continue
        produced |= names
        kept.append(layout)
    return kept


def assign_buckets(
    layouts: Sequence[ParameterLayout], dtype: torch.dtype | None, bucket_bytes: int
) -> list[tuple[list[int], list[TensorMeta]]]:
    """Group parameters, in order, into buckets of at most ``bucket_bytes``.

    A parameter's HF tensors stay together, so a parameter larger than ``bucket_bytes`` (a big
    vocabulary's embedding) travels alone in a bucket of its own size.

    Args:
        layouts: the parameters in stream order.
        dtype: the streamed dtype; None keeps each parameter's.
        bucket_bytes: the cap.

    Returns:
        For each bucket, the indices of its parameters and its tensors' byte ranges.
    """
    buckets: list[tuple[list[int], list[TensorMeta]]] = []
    indices: list[int] = []
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    size, seen = 0, set()
    for index, layout in enumerate(layouts):
        out_dtype = dtype or layout.dtype
        tensors = [(name, out_dtype, shape) for name, shape in layout.hf_shapes()]
        nbytes = sum(math.prod(shape) * out_dtype.itemsize for _, _, shape in tensors)
        for name, _, _ in tensors:
            if name in seen:
                raise ValueError(
                    f"HF tensor {name} comes from two parameters ({layout.rule.megatron} and an earlier one)"
                )
            seen.add(name)
        if indices and size + nbytes > bucket_bytes:
            buckets.append((indices, pack_layout(entries)))
            indices, entries, size = [], [], 0
        indices.append(index)
        entries += tensors
        size += nbytes
    if indices:
        buckets.append((indices, pack_layout(entries)))
    return buckets


def shard_copies(layout: ParameterLayout, shard: int) -> list[tuple[str, int, int, int, int, int, int]]:
    """The 2-D block copies that move one shard's elements to their HF tensors.

    Returns:
        ``(hf_name, source_offset, source_row_stride, out_offset, out_row_stride, rows, row_length)``
        per copy, offsets and strides in elements of the shard and of the HF tensor.
    """
    rule, shape = layout.rule, layout.shard_shape
    dim = rule.dim
    rows = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1 :])
    hf_lengths = dict((name, hf_shape[dim]) for name, hf_shape in layout.hf_shapes())
    copies, offset = [], 0
    for segment in rule.segments(shape[dim], shard, layout.num_shards):
        if segment.hf_name is not None:
            source_stride, out_stride = shape[dim] * inner, hf_lengths[segment.hf_name] * inner
            row_length = segment.length * inner
            source_offset, out_offset = offset * inner, segment.start * inner
            if source_stride == out_stride == row_length:
                copies.append((segment.hf_name, source_offset, 0, out_offset, 0, 1, rows * row_length))
            else:
                copies.append((segment.hf_name, source_offset, source_stride, out_offset, out_stride, rows, row_length))
        offset += segment.length
    if offset != shape[dim]:
        raise ValueError(
            f"{rule.megatron}: its rule's segments cover {offset} of the shard's {shape[dim]} entries "
            f"along dim {dim}; the rule does not match the model's shapes"
        )
    return copies


def _plan_tensor(rows: list[list[int]]) -> torch.Tensor:
    if not rows:
        return empty_plan()
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, PLAN_COLUMNS)


def plan_rank(
    layouts: Sequence[ParameterLayout],
    senders: Mapping[ShardKey, int],
    local: Mapping[ShardKey, int],
    *,
    rank: int,
    dst: int,
    dtype: torch.dtype | None,
    bucket_bytes: int,
) -> list[BucketPlan]:
    """Plan every bucket for one rank.

    Args:
        layouts: the whole model's parameters in stream order, each HF tensor produced once.
        senders: for every shard of every parameter, the global rank that provides it (``dst``
            for shards the destination holds).
        local: the shards this rank holds, each mapped to the index of its local tensor.
        rank: this rank.
        dst: the destination rank, which assembles and yields the buckets.
        dtype: the streamed dtype; None keeps each parameter's.
        bucket_bytes: the bucket cap (see :func:`assign_buckets`).
    """
    plans = []
    for indices, metas in assign_buckets(layouts, dtype, bucket_bytes):
        shards = [(index, shard) for index in indices for shard in range(layouts[index].num_shards)]
        messages, placements = _messages(layouts, shards, senders, dst, dtype)
        local_tensors: list[int] = []
        rows: list[list[int]] = []
        out_bytes = 0
        if rank == dst:
            by_name = {meta.name: meta for meta in metas}
            for key in shards:
                layout = layouts[key[0]]
                if senders[key] == dst:
                    local_tensors.append(local[key])
                    source, base, source_dtype = len(local_tensors), 0, layout.dtype
                else:
                    source, base, source_dtype = 0, placements[key], dtype or layout.dtype
                rows += _bucket_rows(layout, key[1], by_name, source, base, source_dtype)
            out_bytes = metas[-1].end
        elif message := next((message for message in messages if message.sender == rank), None):
            # The message is packed as it will lie in the destination's staging.
            for key in shards:
                if senders[key] != rank:
                    continue
                layout = layouts[key[0]]
                local_tensors.append(local[key])
                # Columns in copy_plan's order: one contiguous copy of the whole shard, cast.
                rows.append(
                    [
                        len(local_tensors), 0, 0, placements[key] - message.offset, 0, 1, layout.shard_numel,
                        dtype_code(layout.dtype), dtype_code(dtype or layout.dtype),
                    ]
                )
            out_bytes = message.nbytes
        plans.append(
            BucketPlan(
                metas=tuple(metas),
                plan=_plan_tensor(rows),
                local_tensors=tuple(local_tensors),
                out_bytes=out_bytes,
                messages=tuple(messages),
            )
        )
    return plans


def _messages(
    layouts: Sequence[ParameterLayout],
    shards: list[ShardKey],
    senders: Mapping[ShardKey, int],
    dst: int,
    dtype: torch.dtype | None,
) -> tuple[list[Message], dict[ShardKey, int]]:
    """The messages of one bucket and where each sent shard lands in the destination's staging.

    A sender's message holds its shards in bucket order, each at an aligned offset, in the
    stream's dtype; messages lie in staging by sender rank.
    """
    by_sender: dict[int, list[ShardKey]] = {}
    for key in shards:
        if senders[key] != dst:
            by_sender.setdefault(senders[key], []).append(key)
    messages, placements, offset = [], {}, 0
    for sender in sorted(by_sender):
        start = end = offset
        for key in by_sender[sender]:
            layout = layouts[key[0]]
            placements[key] = offset
            end = offset + layout.shard_numel * (dtype or layout.dtype).itemsize
            offset = _align(end)
        messages.append(Message(sender=sender, offset=start, nbytes=end - start))
    return messages, placements


def _bucket_rows(
    layout: ParameterLayout,
    shard: int,
    metas: Mapping[str, TensorMeta],
    source: int,
    base: int,
    source_dtype: torch.dtype,
) -> list[list[int]]:
    """Plan rows moving one shard, stored at byte ``base`` of ``source`` as ``source_dtype``, into
    its bucket's HF tensors."""
    source_size = source_dtype.itemsize
    rows = []
    for name, source_offset, source_stride, out_offset, out_stride, count, length in shard_copies(layout, shard):
        meta = metas[name]
        out_size = meta.dtype.itemsize
        rows.append(
            [
                source,
                base + source_offset * source_size,
                source_stride * source_size,
                meta.start + out_offset * out_size,
                out_stride * out_size,
                count,
                length,
                dtype_code(source_dtype),
                dtype_code(meta.dtype),
            ]
        )
    return rows


def _align(offset: int) -> int:
    return -(-offset // MESSAGE_ALIGNMENT) * MESSAGE_ALIGNMENT
