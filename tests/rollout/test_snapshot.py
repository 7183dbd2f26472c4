"""Bucket files (safetensors written from a bucket's buffer, and the handles that map them) and the
weight snapshot made of them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megarl.config import resolve_model_path
from megarl.rollout.bucket_files import encode_handle, open_handle, write_bucket
from megarl.rollout.snapshot import WeightSnapshot
from megarl.weights.bucket import Bucket, TensorMeta

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")


def test_bucket_files_round_trip_mixed_dtypes(tmp_path):
    named = [
        ("a", torch.arange(3, dtype=torch.bfloat16)),  # 6 bytes: the next tensor starts unaligned
        ("b", torch.randn(2, 3)),
        ("c", torch.tensor([True, False])),
        ("d", torch.arange(5, dtype=torch.int64).reshape(5, 1)),
    ]
    bucket = Bucket.from_named_tensors(named)
    path = tmp_path / "bucket.safetensors"
    offset = write_bucket(path, bucket)
    assert offset % 8 == 0 and not (tmp_path / "bucket.safetensors.partial").exists()
    loaded = load_file(path)
    assert all(torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype for name, tensor in named)

    mapped = open_handle(encode_handle(path, offset, bucket))
    assert [(name, tensor.dtype) for name, tensor in mapped.named_tensors()] == [(name, tensor.dtype) for name, tensor in named]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(mapped.named_tensors(), named))
    with pytest.raises(ValueError, match="malformed bucket-file handle"):
        open_handle("bm90IGpzb24=")
    gap = Bucket(buffer=torch.zeros(16, dtype=torch.uint8), metas=[TensorMeta(name="x", dtype=torch.float32, shape=(2,), start=8, end=16)])
    with pytest.raises(ValueError, match="back to back"):
        write_bucket(tmp_path / "gap.safetensors", gap)


def test_snapshot_keeps_one_complete_version(tmp_path):
    snapshot = WeightSnapshot(tmp_path, MOE)
    assert snapshot.current is None and not list(tmp_path.iterdir())
    snapshot.begin("1")
    path, _ = snapshot.add(Bucket.from_named_tensors([("x", torch.ones(2))]))
    assert path.parent.name == "weights-v1.partial"
    first = snapshot.commit()
    assert snapshot.version == "1" and first == snapshot.current
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert not list(first.glob("model.safetensors"))
    snapshot.begin("2")
    snapshot.add(Bucket.from_named_tensors([("x", torch.zeros(2))]))
    snapshot.abort()
    assert snapshot.current == first and first.exists()
    snapshot.begin("2")
    snapshot.add(Bucket.from_named_tensors([("x", torch.zeros(2))]))
    second = snapshot.commit()
    assert not first.exists() and torch.equal(load_file(second / "bucket-00000.safetensors")["x"], torch.zeros(2))
    snapshot.close()
    assert not snapshot.directory.exists()
