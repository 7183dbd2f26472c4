"""Distributed checkpoints: model, optimizer, LR scheduler, RNG states and the data position.

Weights and optimizer state go through megatron-core's ``dist_checkpointing`` in its fully
reshardable format, so a checkpoint saved under one parallel layout loads under another. A save
is atomic: everything is written under ``<root>/.tmp-step_NNNNNNNN`` and renamed to
``<root>/step_NNNNNNNN`` last, by rank 0, after every rank has finished; only names of that form are
ever loaded, so a save killed part way leaves the previous checkpoint as the latest. Old
checkpoints are deleted only after the new one is committed.

Layout of a checkpoint directory::

    step_00000010/
        weights/           dist_checkpointing: "model" (or "model0", "model1", ... with VPP)
                           and "optimizer"
        scheduler.pt       OptimizerParamScheduler.state_dict()
        rng/rank_<r>.pt    Python, NumPy, torch (and CUDA) generators and Megatron's RNG tracker
        train_state.json   step, data position and whatever else the trainer records
        hf/                the HF config and tokenizer files, so conversion needs nothing else
        critic/            with a critic: its own weights/ and scheduler.pt
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megarl.resume import CheckpointError, check_checkpoint, checkpoint_name, committed_checkpoints, step_of

_TEMPORARY_PREFIX = ".tmp-"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Megatron's optimizer state format that reshards across TP, PP, EP and DP on load."""
_MODEL_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


log = logging.getLogger("megarl")


def hf_files(path: str | Path) -> Path:
    """The ``hf/`` folder of checkpoint ``path``: the HF config (and tokenizer) it was saved with.

    Raises:
        CheckpointError: the checkpoint holds no ``hf/config.json``, saying what to copy there.
    """
    folder = Path(path) / "hf"
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{path}: hf/config.json is missing; the checkpoint does not record its HF config. "
            f"Copy the model's config.json (and tokenizer files) into {folder}/"
        )
    return folder


@contextlib.contextmanager
def _placeholder_optimizer_state(optimizer):
    """Give a never-stepped Adam placeholder state while the loading state dict is built.

    Megatron describes what to load from the live optimizer state, which torch's Adam creates only
    at its first step. The placeholders are removed again before ``load_state_dict``, which
    allocates the real state itself when it finds none.
    """
    filled = []
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer else []):
        inner = megatron_optimizer.optimizer
        if not isinstance(inner, torch.optim.Adam) or inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }
        filled.append(inner)
    try:
        yield
    finally:
        for inner in filled:
            inner.state.clear()


def _unwrap(model):
    """The GPTModel inside Megatron's DDP wrapper: checkpoint keys must not depend on wrapping."""
    return getattr(model, "module", model)


def _write_results_in_process() -> None:
    """Hand the torch_dist writer's results over through a plain queue.

    megarl saves synchronously, so the writer's results never leave this process, but megatron-core
    0.16 passes them through a queue served by a ``multiprocessing`` Manager that it starts, at a
    process's first save, in a *spawned* process: a fresh interpreter, 4-6 s per rank on the CPU
    machine, paid by every run's first checkpoint. (Asynchronous saving, which megarl does not use,
    needs the Manager's queue.)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def _sharded_state_dict(models, optimizer, is_loading: bool) -> dict:
    models = [_unwrap(model) for model in models]
    # A new dict each time: Megatron stores the current data-parallel group in it, which must not
    # outlive the parallel state it came from.
    metadata = dict(_SHARDING)
    state = {}
    if len(models) == 1:
        state["model"] = models[0].sharded_state_dict(metadata=metadata)
    else:
        for index, model in enumerate(models):
            state[f"model{index}"] = model.sharded_state_dict(metadata=metadata)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def copy_hf_files(hf_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Copy a HF model's config files from ``hf_dir`` and its tokenizer files from
    ``tokenizer_dir`` (default ``hf_dir``) into ``out_dir``; files a directory lacks are skipped."""
    for source_dir, names in ((hf_dir, _MODEL_FILES), (tokenizer_dir or hf_dir, _TOKENIZER_FILES)):
        for name in names:
            if (Path(source_dir) / name).exists():
                shutil.copy2(Path(source_dir) / name, Path(out_dir) / name)


def save_checkpoint(
    root: str | Path,
    step: int,
    models: list,
    optimizer=None,
    scheduler=None,
    train_state: dict[str, Any] | None = None,
    hf_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    keep_last: int = 1,
    extra_models: dict[str, tuple] | None = None,
) -> Path:
    """Save a checkpoint atomically and keep the last ``keep_last`` committed ones. Collective.

    Committed checkpoints of later steps (from a run this one replaced) are renamed
    ``step_NNNNNNNN.superseded-<unix time>`` when this one commits, so that ``resume=auto`` never
    goes back to them and ``keep_last`` does not count them.

    Args:
        root: the run's checkpoint directory (shared by all ranks).
        step: the training step the checkpoint follows.
        models: the model chunks (Megatron DDP-wrapped or bare).
        optimizer: the Megatron optimizer, or None.
        scheduler: the ``OptimizerParamScheduler``, or None.
        train_state: JSON-serialisable trainer state (data position, counters).
        hf_dir: directory whose HF config (and tokenizer) files are copied into the checkpoint's
            ``hf/``, so that it converts to a HF model on its own.
        tokenizer_dir: where the tokenizer files come from instead (``model.tokenizer_path``).
        keep_last: committed checkpoints to keep, this one included.
        extra_models: further models saved beside the first, by name: ``{"critic": (models,
            optimizer, scheduler)}`` goes to ``critic/weights`` and ``critic/scheduler.pt``.

    Returns:
        The committed checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    parts = {"": (models, optimizer, scheduler), **(extra_models or {})}
    root = Path(root)
    final = root / checkpoint_name(step)
    temporary = root / f"{_TEMPORARY_PREFIX}{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        (temporary / "weights").mkdir(parents=True)
        (temporary / "rng").mkdir()
        for name in parts:
            if name:
                (temporary / name / "weights").mkdir(parents=True)
    dist.barrier()

    _write_results_in_process()
    for name, (part_models, part_optimizer, part_scheduler) in parts.items():
        dist_checkpointing.save(_sharded_state_dict(part_models, part_optimizer, is_loading=False), str(temporary / name / "weights"))
        if rank == 0 and part_scheduler is not None:
            torch.save(part_scheduler.state_dict(), temporary / name / "scheduler.pt")
    torch.save(_rng_state(), temporary / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        state = {"step": step, "world_size": dist.get_world_size(), **(train_state or {})}
        (temporary / "train_state.json").write_text(json.dumps(state, indent=2))
        if hf_dir is not None:
            (temporary / "hf").mkdir()
            copy_hf_files(hf_dir, temporary / "hf", tokenizer_dir)
    dist.barrier()

    if rank == 0:
        if final.exists():
            # Re-saving a step replaces it; the rename below is the commit point.
            shutil.rmtree(final)
        # Later steps come from a run this one replaced (started over, or resumed from an earlier
        # checkpoint): kept aside, never loaded, never counted by keep_last.
        for later in committed_checkpoints(root):
            if step_of(later) > step:
                later.rename(later.with_name(f"{later.name}.superseded-{int(time.time())}"))
        temporary.rename(final)
        for old in committed_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
        for stale in root.glob(f"{_TEMPORARY_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _load_part(directory: Path, models: list, optimizer, scheduler) -> None:
    from megatron.core import dist_checkpointing

    with _placeholder_optimizer_state(optimizer):
        sharded = _sharded_state_dict(models, optimizer, is_loading=True)
    state = dist_checkpointing.load(sharded, str(directory / "weights"))
    if len(models) == 1:
        _unwrap(models[0]).load_state_dict(state["model"])
    else:
        for index, model in enumerate(models):
            _unwrap(model).load_state_dict(state[f"model{index}"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))


def load_checkpoint(
    path: str | Path, models: list, optimizer=None, scheduler=None, extra_models: dict[str, tuple] | None = None, contents: str = "all",
) -> dict[str, Any]:
    """Load a checkpoint into this layout's models (resharding as needed). Collective.

    RNG states are restored when the world size matches the save's (each rank its own), and
    skipped otherwise: a different layout draws different random streams anyway. With
    ``contents`` ``model`` (``checkpoint.load_contents``) only the weights are loaded, of every
    part: optimizers, schedulers and RNG states stay as they are (verl: checkpoint.load_contents).

    Args:
        path: a committed checkpoint directory.
        models, optimizer, scheduler: what :func:`save_checkpoint` saved first (optimizer and
            scheduler may be None to load weights only).
        extra_models: the further models, by name, as given to :func:`save_checkpoint`.
        contents: ``all`` or ``model`` (the weights only).

    Returns:
        The saved ``train_state`` (with ``step``).

    Raises:
        CheckpointError: ``path`` is not a committed checkpoint, or a file of it is damaged
            (:func:`check_files`).
    """
    if contents not in ("all", "model"):
        raise ValueError(f"contents ({contents!r}) must be 'all' or 'model'")
    path = Path(path)
    check_checkpoint(path)
    for name, (part_models, part_optimizer, part_scheduler) in {"": (models, optimizer, scheduler), **(extra_models or {})}.items():
        if not (path / name / "weights").is_dir():
            raise CheckpointError(f"{path}: holds no {name} weights ({path / name / 'weights'} is missing); was it saved by a run without a {name}?")
        if contents == "model":
            part_optimizer = part_scheduler = None
        try:
            _load_part(path / name, part_models, part_optimizer, part_scheduler)
        except Exception as error:  # noqa: BLE001 - damage the file checks cannot see (bytes changed in place)
            raise CheckpointError(f"checkpoint {path} could not be loaded: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    train_state = json.loads((path / "train_state.json").read_text())
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if contents == "all" and train_state.get("world_size") == dist.get_world_size() and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return train_state
