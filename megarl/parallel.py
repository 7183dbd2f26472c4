"""Megatron's parallel state: tensor (TP), pipeline (PP, with virtual stages VPP), context (CP),
expert (EP), expert-tensor (ETP) and data (DP) parallel groups.

Everything downstream receives its process groups explicitly, as a
:class:`megatron.core.process_groups_config.ProcessGroupCollection`, rather than reaching for
Megatron's globals.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """A parallel layout. Data parallelism is what the world size leaves over."""

    tensor: int = 1
    """TP: ranks that split each layer's weights."""
    pipeline: int = 1
    """PP: pipeline stages."""
    virtual_pipeline: int | None = None
    """VPP: model chunks per pipeline stage (interleaved 1F1B); None for plain 1F1B."""
    context: int = 1
    """CP: ranks that split each sequence."""
    expert: int = 1
    """EP: ranks that split the experts of each MoE layer."""
    expert_tensor: int | None = None
    """ETP: ranks that split each expert's weights; None means the same as TP (Megatron's default)."""
    sequence_parallel: bool = False
    """SP: shard activations outside attention and MLP over the TP group (needs TP > 1)."""

    @classmethod
    def from_config(cls, parallel) -> Layout:
        """Build from a ``megarl.config`` parallel section (duck-typed on its field names)."""
        return cls(
            tensor=parallel.tensor,
            pipeline=parallel.pipeline,
            virtual_pipeline=parallel.virtual_pipeline,
            context=parallel.context,
            expert=parallel.expert,
            expert_tensor=parallel.expert_tensor,
            sequence_parallel=parallel.sequence_parallel,
        )

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def data_parallel(self, world_size: int) -> int:
        """DP = world size / (TP x PP x CP)."""
        model_parallel = self.tensor * self.pipeline * self.context
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP x CP = {self.tensor} x "
                f"{self.pipeline} x {self.context} = {model_parallel}: change the parallel layout "
                f"or the number of processes"
            )
        return world_size // model_parallel


def initialize(layout: Layout, timeout_minutes: int = 30) -> ProcessGroupCollection:
    """Create Megatron's process groups for ``layout`` over the initialised world.

    Requires :func:`megarl.platform.init_distributed` first. Re-initialising with another layout
    destroys the previous groups first.

    Returns:
        The process groups, to be passed explicitly to the model and the schedules.
    """
    if not dist.is_initialized():
        raise RuntimeError("call megarl.platform.init_distributed() before megarl.parallel.initialize()")
    layout.data_parallel(dist.get_world_size())
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
