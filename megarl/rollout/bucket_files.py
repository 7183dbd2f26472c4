"""Weight buckets as safetensors files, and the handles that point an engine at them.

A bucket's layout (tensors back to back in one byte buffer, in metadata order) is already the data
section of a safetensors file, so writing a bucket is a header plus one write of its buffer, with
no per-tensor copies. The files serve three purposes:

- the snapshot of the latest weights that a restarted engine is loaded from;
- the ``disk`` transport (``/update_weights_from_disk`` on a directory of them);
- the ``tensor`` transport to the ``hf`` engine on CPU: the file lies in shared memory
  (``/dev/shm``) and the engine maps it, so only a handle travels over HTTP (see
  :func:`encode_handle`).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from megarl.weights.bucket import Bucket, TensorMeta, dtype_name

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_HEADER_ALIGNMENT = 8


def write_bucket(path: Path, bucket: Bucket) -> int:
    """Write ``bucket`` as a safetensors file (via a temporary name, so a reader never sees half).

    Args:
        path: the file to create.
        bucket: on any device; a GPU buffer is copied to the host first.

    Returns:
        Byte offset of the bucket's buffer in the file (the safetensors data section).
    """
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for meta in bucket.metas:
        if meta.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"bucket tensor {meta.name}: dtype {dtype_name(meta.dtype)} has no safetensors code")
        if meta.start != offset:
            raise ValueError(f"bucket tensor {meta.name} starts at byte {meta.start}, not {offset}: buckets must hold their tensors back to back")
        offset = meta.end
        entries[meta.name] = {"dtype": _SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape), "data_offsets": [meta.start, meta.end]}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % _HEADER_ALIGNMENT)
    data = bucket.buffer[: bucket.nbytes].cpu()
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        handle.write(memoryview(data.numpy()))
    os.replace(partial, path)
    return 8 + len(header)


def encode_handle(path: Path, data_offset: int, bucket: Bucket) -> str:
    """A bucket-file handle as one ``serialized_named_tensors`` entry (base64 of JSON).

    SGLang's field carries base64 payloads; for the ``hf`` engine the payload names a file in
    shared memory and where the bucket lies in it, instead of pickled tensors.
    """
    handle = {"path": str(path), "data_offset": data_offset, "nbytes": bucket.nbytes, "metadata": bucket.metadata_json()}
    return base64.b64encode(json.dumps(handle).encode()).decode()


def open_handle(payload: str) -> Bucket:
    """The bucket a handle names, mapped from its file (read-only, no copy of the data).

    Raises:
        ValueError: a malformed handle, or a file shorter than the handle says.
    """
    try:
        handle = json.loads(base64.b64decode(payload, validate=True))
        path, data_offset, nbytes = str(handle["path"]), int(handle["data_offset"]), int(handle["nbytes"])
        metas = [TensorMeta.from_json(fields) for fields in handle["metadata"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"malformed bucket-file handle: {error}") from None
    size = os.path.getsize(path)
    if data_offset + nbytes > size:
        raise ValueError(f"bucket file {path} holds {size} bytes; the handle needs {data_offset + nbytes}")
    mapped = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    return Bucket(buffer=mapped[data_offset : data_offset + nbytes], metas=metas)
