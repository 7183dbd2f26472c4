"""Save and load distributed checkpoints across layouts (the ``save`` and ``load`` checks of a
checkpoint job, tests/workers/suite.py; for tests/trainer/test_checkpoint.py).

``save``: load the HF weights, take one optimizer step, save a checkpoint at ``step`` under
``root`` and write the exported HF tensors to ``export``. ``crash_after_weights`` kills the
process in the middle of the save (after the weights, before the commit). ``load``: resume
(``resume``: auto, never or a path) into a fresh model, optimizer and scheduler of this job's
layout (``model_only``: the weights alone, ``checkpoint.load_contents`` model) and write its
exported HF tensors to ``export``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megarl.models.builder import build_model, model_spec
from megarl.models.exporter import export_hf_tensors
from megarl.models.loader import load_hf_config, load_hf_weights
from megarl import checkpoint
from megarl.resume import resolve_resume


def build(model_dir: str, pg_collection, layout):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    spec = model_spec(load_hf_config(model_dir), layout)
    chunks = build_model(spec, "torch", pg_collection)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    models = [DistributedDataParallel(spec.transformer_config, ddp_config, c, pg_collection=pg_collection) for c in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0), models
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=1e-3, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant",
    )
    return spec, chunks, models, optimizer, scheduler


def train_one_step(spec, models, optimizer, scheduler):
    """One forward/backward/optimizer step on a fixed batch (single pipeline stage)."""
    tokens = torch.randint(0, spec.hf_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = models[0](tokens, torch.arange(16).expand_as(tokens), None, labels=tokens).mean()
    loss.backward()
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(models)
    optimizer.step()
    scheduler.step(increment=1)


def save(model_dir: str, layout, pg_collection, root: str, export: str, step: int = 1, crash_after_weights: bool = False) -> dict | None:
    spec, chunks, models, optimizer, scheduler = build(model_dir, pg_collection, layout)
    load_hf_weights(chunks, spec, pg_collection, model_dir)
    optimizer.reload_model_params()
    train_one_step(spec, models, optimizer, scheduler)
    if crash_after_weights:
        # Die after the weights are written, before the commit (rank 0's rename).
        original_save = torch.save

        def crash(obj, path, *rest, **kwargs):
            original_save(obj, path, *rest, **kwargs)
            os._exit(17)

        checkpoint.torch.save = crash
    checkpoint.save_checkpoint(
        root, step, models, optimizer, scheduler,
        train_state={"consumed_prompts": 32 * step}, hf_dir=model_dir, keep_last=2,
    )
    return write_export(chunks, spec, pg_collection, export, {"step": step})


def load(model_dir: str, layout, pg_collection, root: str, export: str, resume: str = "auto", model_only: bool = False) -> dict | None:
    spec, chunks, models, optimizer, scheduler = build(model_dir, pg_collection, layout)
    path = resolve_resume(resume, root)
    torch.manual_seed(12345)  # a state the saving process never had: whether the load restores its RNG shows
    rng_before = torch.get_rng_state()
    state = checkpoint.load_checkpoint(path, models, optimizer, scheduler, contents="model" if model_only else "all") if path else {"step": 0}
    state["path"] = str(path)
    state["rng_kept"] = torch.equal(rng_before, torch.get_rng_state())
    if optimizer is not None:
        state["lr"] = optimizer.param_groups[0]["lr"]
        steps = [
            adam_state["step"]
            for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            for adam_state in inner.optimizer.state.values()
        ]
        # Adam advances each step tensor in place: one shared by several parameters would
        # advance several times per optimizer step.
        state["adam_steps"] = [float(step) for step in steps]
        state["adam_step_tensors_distinct"] = len({step.data_ptr() for step in steps}) == len(steps)
    return write_export(chunks, spec, pg_collection, export, state)


def write_export(chunks, spec, pg_collection, export: str, state: dict) -> dict | None:
    """Rank 0 saves the exported HF tensors to ``export``; the report (rank 0) is ``state``."""
    exported = dict(export_hf_tensors(chunks, spec, pg_collection, dst=0))
    if dist.get_rank() != 0:
        return None
    torch.save(exported, export)
    return state
