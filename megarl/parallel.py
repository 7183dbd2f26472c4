"""Megatron's parallel state: tensor (TP), pipeline (PP, with virtual stages VPP), context (CP),
expert (EP), expert-tensor (ETP) and data (DP) parallel groups.

Everything downstream receives its process groups explicitly, as a
:class:`megatron.core.process_groups_config.ProcessGroupCollection`, rather than reaching for
Megatron's globals.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megarl.config import ParallelConfig


def initialize(layout: ParallelConfig, timeout_minutes: int = 30) -> ProcessGroupCollection:
    """Create Megatron's process groups for ``layout`` over the initialised world.

    Requires :func:`megarl.platform.init_distributed` first. Re-initialising with another layout
    destroys the previous groups first.

    Returns:
        The process groups, to be passed explicitly to the model and the schedules.
    """
    if not dist.is_initialized():
        raise RuntimeError("call megarl.platform.init_distributed() before megarl.parallel.initialize()")
    world_size = dist.get_world_size()
    if world_size % layout.model_parallel():
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP x CP = {layout.tensor} x "
            f"{layout.pipeline} x {layout.context}: change the parallel layout or the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
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


def destroy() -> None:
    """Tear down Megatron's process groups (torch.distributed itself stays up)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
