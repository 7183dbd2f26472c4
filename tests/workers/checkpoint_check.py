"""Save and load distributed checkpoints across layouts (torchrun worker for
tests/trainer/test_checkpoint.py).

``--mode save``: load the HF weights, take one optimizer step, save a checkpoint at ``--step`` and
write the exported HF tensors to ``--export``. ``--crash-after-weights`` kills the process in the
middle of the save (after the weights, before the commit). ``--mode load``: resume (``--resume``:
auto, never or a path) into a fresh model of another layout and write its exported HF tensors.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from common import add_layout_arguments, initialize, run
from megarl.models.builder import build_model, load_hf_config, model_spec
from megarl.models.exporter import export_hf_tensors
from megarl.models.loader import load_hf_weights
from megarl.trainer import checkpoint


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", required=True, help="checkpoint root directory")
    parser.add_argument("--mode", choices=["save", "load"], required=True)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--export", required=True, help="rank 0 writes the exported HF tensors here")
    parser.add_argument("--crash-after-weights", action="store_true")
    parser.add_argument("--model-only", action="store_true", help="load: weights only, no optimizer/scheduler")
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def build(args, pgs, layout):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    spec = model_spec(load_hf_config(args.model), layout)
    chunks = build_model(spec, "torch", pgs)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    models = [DistributedDataParallel(spec.transformer_config, ddp_config, c, pg_collection=pgs) for c in chunks]
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


def main(argv):
    args = parse_args(argv)
    layout, pgs = initialize(args)
    spec, chunks, models, optimizer, scheduler = build(args, pgs, layout)
    if args.mode == "save":
        load_hf_weights(chunks, spec, pgs, args.model)
        optimizer.reload_model_params()
        train_one_step(spec, models, optimizer, scheduler)
        if args.crash_after_weights:
            # Die after the weights are written, before the commit (rank 0's rename).
            original_save = torch.save

            def crash(obj, path, *rest, **kwargs):
                original_save(obj, path, *rest, **kwargs)
                os._exit(17)

            checkpoint.torch.save = crash
        checkpoint.save_checkpoint(
            args.root, args.step, models, optimizer, scheduler,
            train_state={"consumed_prompts": 32 * args.step}, hf_dir=args.model, keep_last=2,
        )
        state = {"step": args.step}
    else:
        path = checkpoint.resolve_resume(args.resume, args.root)
        if args.model_only:
            optimizer = scheduler = None
        state = checkpoint.load_checkpoint(path, models, optimizer, scheduler) if path else {"step": 0}
        state["path"] = str(path)
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
    exported = dict(export_hf_tensors(chunks, spec, pgs, dst=0))
    if dist.get_rank() == 0:
        torch.save(exported, args.export)
        with open(args.export + ".json", "w") as handle:
            json.dump(state, handle)


if __name__ == "__main__":
    run(main)
