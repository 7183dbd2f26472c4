"""Megatron's parallel state: tensor (TP), pipeline (PP, with virtual stages VPP), context (CP),
expert (EP), expert-tensor (ETP) and data (DP) parallel groups.

Everything downstream receives its process groups explicitly, as a
:class:`megatron.core.process_groups_config.ProcessGroupCollection`, rather than reaching for
Megatron's globals.
"""

from __future__ import annotations

import torch.distributed as dist

from megarl.config import ConfigError, ParallelConfig, world_size_errors
from megarl.megatron_compat import lean_megatron_import

# The first import of megatron-core on the training path: without the compiler stack and wandb.
with lean_megatron_import():
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection


def initialize(layout: ParallelConfig, timeout_minutes: int = 30) -> ProcessGroupCollection:
    """Create Megatron's process groups for ``layout`` over the initialised world.

    Requires :func:`megarl.platform.init_distributed` first. Re-initialising with another layout
    destroys the previous groups first, Megatron's and any other but the default one
    (:func:`destroy`).

    Returns:
        The process groups, to be passed explicitly to the model and the schedules.

    Raises:
        ConfigError: the layout does not fit the world size (:func:`megarl.config.world_size_errors`;
            a run checks the whole layout against the model before, with :func:`megarl.config.validate`).
    """
    if not dist.is_initialized():
        raise RuntimeError("call megarl.platform.init_distributed() before megarl.parallel.initialize()")
    problems = world_size_errors(layout, dist.get_world_size())
    if problems:
        raise ConfigError("\n".join(problems))
    if parallel_state.model_parallel_is_initialized():
        destroy()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def seed(value: int) -> None:
    """Seed torch and Megatron's model-parallel random states (the same on every rank; Megatron
    offsets the tensor- and expert-parallel streams itself)."""
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(value)
    model_parallel_cuda_manual_seed(value)


def destroy() -> None:
    """Tear down Megatron's process groups, and every other group but the default one: each is
    shut down now, its communication threads with it (gloo keeps two or three per group; Megatron's
    own teardown only forgets its groups, so a process that re-initialised for many layouts kept
    thousands of threads, which went on polling). torch.distributed itself stays up."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        # torch lists the groups it made only in this private registry.
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not dist.GroupMember.WORLD:
                dist.destroy_process_group(group)
