"""The critic (value model) on Megatron, trained when the advantages come from GAE.

The critic is the policy's architecture with the output layer replaced by a value head: one
weight vector ``[1, H]``, zero at the start (so the first values are 0 and GAE starts from the
discounted returns), replicated over tensor-parallel ranks. It starts from ``critic.path`` or the
policy's HF weights. The value at label position ``t`` is V of the prefix ending at token ``t``,
the state in which token ``t + 1`` was sampled, so values, rewards and advantages line up per
response token.

With sequence parallelism the final hidden states are split along the sequence over the TP ranks:
the head gathers its outputs (each rank keeps the gradient of its own part) and its weight is
marked ``sequence_parallel`` so that Megatron all-reduces its gradient over the TP group.

The critic is the value update's :class:`~megarl.trainer.objective.Objective`.
"""

from __future__ import annotations

import torch

from megarl.algorithms.value_loss import value_loss
from megarl.config import CriticConfig
from megarl.platform import current_device
from megarl.trainer.batch import TrainBatch
from megarl.trainer.model import TrainModel
from megarl.trainer.objective import ModelObjective, aggregate_micro_batch
from megarl.trainer.packing import to_grid


class ValueHead(torch.nn.Module):
    """Takes the place of ``GPTModel.output_layer``: hidden ``[s, b, H]`` -> values ``[s, b, 1]``.

    Args:
        hidden_size: H.
        dtype: the parameter dtype.
        sequence_parallel: the hidden states arrive split along the sequence over ``tp_group``.
        tp_group: the tensor-parallel group.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype, *, sequence_parallel: bool, tp_group):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=current_device()))
        # Megatron all-reduces the gradients of parameters marked so over the TP group.
        self.weight.sequence_parallel = sequence_parallel
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        values = torch.nn.functional.linear(hidden_states, self.weight)
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            values = gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False, group=self.tp_group)
        return values, None


def attach_value_heads(chunks: list, spec) -> None:
    """Replace the output layer of the last pipeline stage's chunk with a :class:`ValueHead`, and
    untie the embedding (the critic has no output projection to share it with)."""
    config = spec.transformer_config
    for chunk in chunks:
        chunk.share_embeddings_and_output_weights = False
        if chunk.post_process:
            chunk.output_layer = ValueHead(
                config.hidden_size, config.params_dtype, sequence_parallel=config.sequence_parallel, tp_group=chunk.pg_collection.tp
            )


class Critic(ModelObjective):
    """The value model under training, and the value update's objective.

    Args:
        model: the Megatron model (built with :func:`attach_value_heads`) and its optimizer.
        critic: the value clipping.
        loss_agg_mode: ``algorithm.loss_agg_mode``, the same aggregation as the policy's.
        max_response_length: ``data.max_response_length``, L of ``seq-mean-token-sum-norm``.
        seed: ``train.seed``, which seeds the mini-batch shuffling with the step.
    """

    fields = ("values", "returns")
    metrics = ("value_clip_fraction", "value_error")
    """Token sums of the clip fraction and of the squared error to the returns."""

    def __init__(self, model: TrainModel, critic: CriticConfig, *, loss_agg_mode: str, max_response_length: int, seed: int):
        self.model = model
        self.value_clip = critic.value_clip
        self.loss_agg_mode = loss_agg_mode
        self.max_response_length = max_response_length
        self.seed = seed
        self.pg_collection = model.pg_collection

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """V at every position, no gradient: ``[B, S]`` float32 in label space on every rank, 0
        outside the response mask."""
        return self.model.forward(batch, ("values",), lambda micro, output: {"values": to_grid(micro, output.squeeze(-1))})["values"]

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Regress the values on ``batch``'s ``returns`` (clipped around ``values``), with the
        policy's epochs and mini-batches.

        Returns:
            ``critic/loss``, ``critic/value_clip_fraction``, ``critic/value_error`` (mean squared
            error), ``critic/grad_norm``, ``critic/lr``, averaged over the mini-batches, and
            ``critic/skipped_steps`` (non-finite gradients).
        """
        metrics = self.model.update(batch, self, seed=self.seed * 1_000_003 + step + 1)
        return {f"critic/{name}": value for name, value in metrics.items()}

    def loss(self, micro: dict[str, torch.Tensor], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's ``(loss_sum, count, {metric: token sum})`` from the values ``[b, s, 1]``
        (:class:`~megarl.trainer.objective.Objective`)."""
        mask = micro["response_mask"]
        values = to_grid(micro, values.squeeze(-1).float())
        per_token, metrics = value_loss(values, micro["values"], micro["returns"], mask, value_clip=self.value_clip)
        loss_sum, count = aggregate_micro_batch(per_token, micro, self.loss_agg_mode, self.max_response_length, self.pg_collection.cp.rank())
        tokens = mask.sum().double()
        error = torch.where(mask.bool(), (values.detach() - micro["returns"]).square(), 0.0).sum().double()
        return loss_sum, count, {"value_clip_fraction": metrics["value_clip_fraction"].double() * tokens, "value_error": error}
