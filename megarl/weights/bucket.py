"""A weight-update bucket: HF-named tensors packed back to back in one flat byte buffer.

This is the unit the weight stream produces and the rollout engines consume. Its layout is
SGLang's ``FlattenedTensorBucket`` (``sglang.srt.weight_sync.tensor_bucket``, the multi-dtype
version): a ``uint8`` buffer in which tensor ``i`` occupies bytes ``[start_i, end_i)``, contiguous,
row-major, in the order of the metadata, with no padding between tensors (``start_0 = 0``,
``start_{i+1} = end_i``). So a bucket can be handed to SGLang as it is, and an engine rebuilds
each tensor as a view: ``buffer[start:end].view(dtype).reshape(shape)``.

Tensors are packed without alignment padding, as SGLang does; a view of a ``dtype`` whose offset
is not a multiple of its element size needs a copy (:meth:`Bucket.named_tensors` makes one only
then). Padding each tensor to 16 bytes is not an option: SGLang's ``/update_weights_from_tensor``
reads each tensor's ``start_idx``/``end_idx`` from the metadata, but
``/update_weights_from_distributed`` with ``load_format: flattened_bucket`` rebuilds the layout
from names, dtypes and shapes alone, back to back (``FlattenedTensorBucket(named_tensors=...)``),
and a safetensors file (the snapshot) may hold no gaps. The CUDA copy engine moves a tensor that
starts off a 16-byte boundary in 16-byte words all the same (``csrc/copy_plan_cuda.cu``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

_DTYPES_BY_NAME = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name used in JSON metadata)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) -> ``torch.bfloat16``; a clear error otherwise."""
    key = name.removeprefix("torch.")
    if key not in _DTYPES_BY_NAME:
        raise ValueError(f"unsupported tensor dtype {name!r} in bucket metadata; expected one of {sorted(_DTYPES_BY_NAME)}")
    return _DTYPES_BY_NAME[key]


@dataclasses.dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one HF tensor lies in a bucket's buffer."""

    name: str
    """HF checkpoint name, e.g. ``model.layers.0.mlp.experts.3.gate_proj.weight``."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """First byte in the buffer."""
    end: int
    """One past the last byte: ``start + numel * element_size``."""

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def aligned(self) -> bool:
        """Whether it starts at a multiple of its element size, so that the buffer's slice can be
        viewed as its dtype in place (SGLang's flattened buckets need that)."""
        return self.start % self.dtype.itemsize == 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able fields (dtype by name)."""
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape), "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> TensorMeta:
        """The inverse of :meth:`to_json`; raises ``ValueError`` naming the tensor on bad fields."""
        try:
            meta = cls(
                name=str(fields["name"]),
                dtype=dtype_from_name(str(fields["dtype"])),
                shape=tuple(int(size) for size in fields["shape"]),
                start=int(fields["start"]),
                end=int(fields["end"]),
            )
        except KeyError as missing:
            raise ValueError(f"bucket metadata entry {fields!r} lacks {missing}") from None
        expected = meta.numel * meta.dtype.itemsize
        if meta.end - meta.start != expected:
            raise ValueError(
                f"bucket metadata for {meta.name}: bytes [{meta.start}, {meta.end}) do not hold "
                f"{list(meta.shape)} x {dtype_name(meta.dtype)} ({expected} bytes)"
            )
        return meta


def pack_layout(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[TensorMeta]:
    """Byte ranges of tensors packed back to back in the given order (SGLang's layout).

    Args:
        entries: ``(name, dtype, shape)`` in bucket order.
    """
    metas, offset = [], 0
    for name, dtype, shape in entries:
        shape = tuple(int(size) for size in shape)
        numel = 1
        for size in shape:
            numel *= size
        end = offset + numel * dtype.itemsize
        metas.append(TensorMeta(name=name, dtype=dtype, shape=shape, start=offset, end=end))
        offset = end
    return metas


@dataclasses.dataclass(slots=True)
class Bucket:
    """HF tensors packed in one flat byte buffer.

    Attributes:
        buffer: ``[nbytes]`` uint8, on the device the stream ran on.
        metas: each tensor's name, dtype, shape and byte range, in buffer order.
    """

    buffer: torch.Tensor
    metas: list[TensorMeta]

    def __post_init__(self):
        if self.buffer.dtype != torch.uint8 or self.buffer.dim() != 1:
            raise ValueError(f"a bucket's buffer must be a flat uint8 tensor, got {self.buffer.dtype} {tuple(self.buffer.shape)}")
        needed = self.metas[-1].end if self.metas else 0
        if needed > self.buffer.numel():
            raise ValueError(f"bucket metadata needs {needed} bytes; the buffer holds {self.buffer.numel()}")

    @property
    def nbytes(self) -> int:
        """Bytes the tensors occupy (the buffer may be a larger, reused allocation)."""
        return self.metas[-1].end if self.metas else 0

    @classmethod
    def from_named_tensors(cls, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Bucket:
        """Pack tensors as they are (their own dtypes), in order. The plain reference path."""
        named = [(name, tensor.detach().contiguous()) for name, tensor in named_tensors]
        metas = pack_layout((name, tensor.dtype, tuple(tensor.shape)) for name, tensor in named)
        device = named[0][1].device if named else torch.device("cpu")
        buffer = torch.empty(metas[-1].end if metas else 0, dtype=torch.uint8, device=device)
        for meta, (_, tensor) in zip(metas, named):
            buffer[meta.start : meta.end].copy_(tensor.reshape(-1).view(torch.uint8))
        return cls(buffer=buffer, metas=metas)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each tensor: views of the buffer where aligned, else copies."""
        result = []
        for meta in self.metas:
            raw = self.buffer[meta.start : meta.end]
            if not meta.aligned:
                raw = raw.clone()
            result.append((meta.name, raw.view(meta.dtype).reshape(meta.shape)))
        return result

    def metadata_json(self) -> list[dict[str, Any]]:
        """The metadata as plain JSON-able dicts."""
        return [meta.to_json() for meta in self.metas]
