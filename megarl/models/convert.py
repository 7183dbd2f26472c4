"""Checkpoint conversion: HuggingFace directory <-> megarl distributed checkpoint.

``tools/convert_to_hf.py`` and ``tools/convert_from_hf.py`` are thin command-line wrappers around
:func:`checkpoint_to_hf` and :func:`hf_to_checkpoint`. Both run as one process or under
``torchrun`` with any parallel layout (the checkpoint reshards on load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from megarl import parallel, platform
from megarl.config import ParallelConfig
from megarl.models.builder import DTYPES, build_model, model_spec
from megarl.models.exporter import export_hf_tensors
from megarl.models.loader import load_hf_config, load_hf_weights
from megarl import checkpoint
from megarl.resume import CheckpointError, committed_checkpoint

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""HF's own default shard size for ``save_pretrained`` (5 GB)."""

def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write ``(name, tensor)`` pairs as HF safetensors shards plus ``model.safetensors.index.json``.

    Shards are filled in arrival order up to ``max_shard_bytes`` and written as soon as they are
    full (one shard in memory at a time), then named ``model-0000i-of-0000n.safetensors`` (a single
    shard is ``model.safetensors``, no index).

    Returns:
        The tensor names written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_size = 0

    def flush():
        path = out_dir / f".model-{len(written) + 1:05d}.safetensors.partial"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))

    names = []
    for name, tensor in tqdm(tensors, desc="export", unit="tensor"):
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total_size += size
        names.append(name)
    flush()
    if len(written) == 1:
        written[0][0].rename(out_dir / "model.safetensors")
        return names
    weight_map = {}
    for index, (path, shard_names) in enumerate(written, start=1):
        file_name = f"model-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(out_dir / file_name)
        weight_map.update(dict.fromkeys(shard_names, file_name))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )


def check_export_target(out_dir: str | Path) -> None:
    """An export goes to a new or empty directory, or replaces a HF model directory whole.

    Raises:
        CheckpointError: ``out_dir`` holds files but is not a HF model directory (config.json and
            safetensors): replacing it could delete something else.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_hf_model_dir(out_dir))):
        raise CheckpointError(
            f"{out_dir}: exists and is not an empty directory or a HF model directory (config.json and "
            f"safetensors), which an export replaces whole: choose a new directory"
        )


def export_hf_dir(
    chunks, spec, pg_collection, out_dir: str | Path, hf_dir: str | Path, *, dtype: torch.dtype,
    tokenizer_dir: str | Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Megatron model as a HF model directory: safetensors in ``dtype``, the config of
    ``hf_dir`` (its ``dtype`` set to ``dtype``, as transformers reads it) and the tokenizer files of
    ``tokenizer_dir`` (default ``hf_dir``). Collective; the first rank writes.

    The directory is written beside ``out_dir`` and then put in its place, so that ``out_dir`` holds
    exactly the new files (a previous export's shards do not linger next to a new index) and a
    failed export leaves the previous one whole (see :func:`check_export_target`).
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    tensors = ((name, tensor.to(dtype)) for name, tensor in export_hf_tensors(chunks, spec, pg_collection, dst=0))
    if dist.get_rank() != 0:
        for _ in tensors:
            pass
        dist.barrier()
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_safetensors(tensors, staging, max_shard_bytes)
    checkpoint.copy_hf_files(hf_dir, staging, tokenizer_dir)
    config = json.loads((staging / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = _dtype_name(dtype)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()
    return out_dir


def _config_dtype(hf_config) -> torch.dtype:
    """The dtype a HF config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in DTYPES.values() else torch.float32


def _layout_and_groups(layout: ParallelConfig):
    platform_info = platform.init_distributed()
    pg_collection = parallel.initialize(layout)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    return platform_info, pg_collection


def hf_to_checkpoint(hf_dir: str | Path, out_root: str | Path, layout: ParallelConfig, dtype: str = "fp32", step: int = 0) -> Path:
    """Load a HF checkpoint under ``layout`` and save it as a megarl distributed checkpoint.

    Args:
        hf_dir: HF model directory (config.json, safetensors, tokenizer).
        out_root: checkpoint root; the checkpoint is written to ``out_root/step_<step>``.
        layout: the parallel layout to load under (the world size must match it).
        dtype: parameter dtype of the checkpoint (``fp32``, ``bf16`` or ``fp16``).
        step: the step number recorded in the checkpoint.
    """
    _, pg_collection = _layout_and_groups(layout)
    spec = model_spec(load_hf_config(hf_dir), layout, dtype=DTYPES[dtype])
    chunks = build_model(spec, "torch", pg_collection)
    load_hf_weights(chunks, spec, pg_collection, hf_dir)
    return checkpoint.save_checkpoint(out_root, step, chunks, hf_dir=hf_dir, train_state={"source": str(hf_dir)})


def checkpoint_to_hf(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    layout: ParallelConfig | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export a megarl checkpoint as a HF model directory (config, tokenizer, safetensors).

    Args:
        checkpoint_path: a committed checkpoint (``.../step_NNNNNNNN``) or a checkpoint root (its
            latest committed checkpoint is used).
        out_dir: the HF directory to write: new, empty, or a HF model directory it replaces
            (:func:`check_export_target`).
        layout: the layout to load under (world size must match); the default single process.
        dtype: dtype of the exported tensors (``fp32``, ``bf16``, ``fp16``); default: the dtype
            the HF config declares, else fp32.
        max_shard_bytes: largest safetensors shard.
    """
    check_export_target(out_dir)
    path = committed_checkpoint(checkpoint_path)
    hf_files = checkpoint.hf_files(path)
    layout = layout or ParallelConfig()
    _, pg_collection = _layout_and_groups(layout)
    hf_config = load_hf_config(hf_files)
    export_dtype = DTYPES[dtype] if dtype else _config_dtype(hf_config)
    spec = model_spec(hf_config, layout, dtype=torch.float32)
    chunks = build_model(spec, "torch", pg_collection)
    checkpoint.load_checkpoint(path, chunks)
    return export_hf_dir(chunks, spec, pg_collection, out_dir, hf_files, dtype=export_dtype, max_shard_bytes=max_shard_bytes)
