"""Megatron's optimizer and learning-rate schedule from megarl's config.

Adam runs through ``megatron.core.optimizer`` (the distributed optimizer shards its state over the
data-parallel ranks when ``train.use_distributed_optimizer``), so mixed precision, gradient
clipping over every parallel group and resharding checkpoints come from Megatron. The schedule is
Megatron's ``OptimizerParamScheduler``: linear warm-up from 0 to ``optimizer.lr`` over
``train.lr_warmup_steps`` optimizer steps, then constant, linear or cosine decay to
``optimizer.min_lr`` at the run's last optimizer step. As in Megatron (and HF's schedules) the
learning rate of the first step of a warm-up is 0.
"""

from __future__ import annotations

import torch

from megarl.config import OptimizerConfig


def build_optimizer(
    models: list,
    config: OptimizerConfig,
    *,
    dtype: torch.dtype,
    use_distributed_optimizer: bool,
):
    """Megatron's Adam over DDP-wrapped model chunks.

    Args:
        models: the chunks wrapped in Megatron's ``DistributedDataParallel``.
        config: ``train.optimizer`` or ``critic.optimizer``.
        dtype: the parameters' dtype (bf16/fp16 keep fp32 main weights in the optimizer).
        use_distributed_optimizer: shard the optimizer state over data-parallel ranks.
    """
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_eps=config.adam_eps,
        clip_grad=config.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    # Megatron builds the optimizer's groups (including the gloo copies the distributed optimizer
    # checkpoints through) from its parallel state, which pg_collection mirrors.
    optimizer = get_megatron_optimizer(megatron_config, models)
    _step_tensors_together(optimizer)
    return optimizer


def _step_tensors_together(optimizer) -> None:
    """Make torch's Adam (Megatron's choice without TE or apex) update all of a group's tensors in
    one ``_foreach`` call per operation, as it already does by default for CUDA tensors; for CPU
    tensors torch defaults to one call per tensor per operation, which costs the main job about
    5 ms per optimizer step (docs/benchmarks.md, "Main job"). The arithmetic is the same."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for megatron_optimizer in inner:
        adam = megatron_optimizer.optimizer
        if isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
            adam.defaults["foreach"] = True
            for group in adam.param_groups:
                group["foreach"] = True


def build_scheduler(optimizer, config: OptimizerConfig, *, style: str, warmup_steps: int, total_steps: int):
    """Megatron's ``OptimizerParamScheduler``: warm-up, then ``style`` decay over the run.

    Args:
        optimizer: from :func:`build_optimizer`.
        config: the optimizer's config (peak ``lr`` and ``min_lr``).
        style: ``constant``, ``linear`` or ``cosine`` (``train.lr_schedule``).
        warmup_steps: optimizer steps of linear warm-up from 0.
        total_steps: optimizer steps in the whole run; decay ends there.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(total_steps, warmup_steps + 1),
        lr_decay_style=style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
