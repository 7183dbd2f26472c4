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
"""

from __future__ import annotations

import functools

import torch

from megarl.algorithms.value_loss import value_loss
from megarl.config import Config
from megarl.platform import current_device
from megarl.trainer.batch import TrainBatch, gather_token_values
from megarl.trainer.model import TrainModel, aggregate_micro_batch

UPDATE_METRICS = ("loss_sum", "count", "tokens", "value_clip_fraction", "value_error")
"""The sums each micro-batch reports: the aggregated loss and its normaliser, the valid tokens,
then token-weighted sums of the clip fraction and of the squared error."""


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


class Critic:
    """The value model under training.

    Args:
        model: the Megatron model (built with :func:`attach_value_heads`) and its optimizer.
        config: the run's config.
    """

    def __init__(self, model: TrainModel, config: Config):
        self.model = model
        self.config = config
        self.pg_collection = model.pg_collection

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """V at every position, no gradient: ``[B, S]`` float32 in label space on every rank, 0
        outside the response mask."""
        micro_batches = self.model.micro_batches(batch, torch.arange(batch.size), fields=())
        outputs = self.model.run(micro_batches, self._forward_step_values, forward_only=True)
        values = batch.empty_token_values()
        for output in outputs:
            values[output["rows"][:, None], output["columns"][None, :]] = output["values"]
        values = gather_token_values(values.to(current_device()), self.pg_collection, is_last_stage=self.model.is_last_stage).cpu()
        return torch.where(batch.response_mask, values, 0.0)

    def _forward_step_values(self, data_iterator, model):
        micro = next(data_iterator)
        device = current_device()
        output = model(micro["tokens"].to(device), micro["position_ids"].to(device), None)

        def collect(values, non_loss_data=True):
            return {"rows": micro["rows"], "columns": micro["columns"], "values": values.squeeze(-1).float().cpu()}

        return output, collect

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Regress the values on ``batch``'s ``returns`` (clipped around ``values``), with the
        policy's epochs and mini-batches.

        Returns:
            ``critic/loss``, ``critic/value_clip_fraction``, ``critic/value_error`` (mean squared
            error), ``critic/grad_norm``, ``critic/lr``, averaged over the mini-batches, and
            ``critic/skipped_steps`` (non-finite gradients).
        """
        seed = self.config.train.seed * 1_000_003 + step + 1
        metrics = self.model.update(batch, ["values", "returns"], self._forward_step_loss, len(UPDATE_METRICS), seed, _update_metrics)
        return {f"critic/{name}": value for name, value in metrics.items()}

    def _forward_step_loss(self, data_iterator, model):
        micro = next(data_iterator)
        device = current_device()
        output = model(micro["tokens"].to(device), micro["position_ids"].to(device), None)
        return output, functools.partial(self._loss, {name: value.to(device) for name, value in micro.items()})

    def _loss(self, micro: dict[str, torch.Tensor], values: torch.Tensor):
        """The micro-batch's ``(loss_sum, count, {"sums": UPDATE_METRICS})`` for Megatron."""
        mask = micro["response_mask"]
        values = values.squeeze(-1).float()
        per_token, metrics = value_loss(values, micro["values"], micro["returns"], mask, value_clip=self.config.critic.value_clip)
        loss_sum, count = aggregate_micro_batch(
            per_token, micro, self.config.algorithm.loss_agg_mode, self.config.data.max_response_length, self.pg_collection.cp.rank()
        )
        tokens = mask.sum().double()
        error = torch.where(mask.bool(), (values.detach() - micro["returns"]).square(), 0.0).sum().double()
        sums = torch.stack(
            [loss_sum.detach().double(), count.double(), tokens, metrics["value_clip_fraction"].double() * tokens, error]
        )
        return loss_sum, count, {"sums": sums}


def _update_metrics(sums: torch.Tensor) -> dict[str, float]:
    values = dict(zip(UPDATE_METRICS, sums.tolist()))
    tokens = max(values["tokens"], 1.0)
    return {
        "loss": values["loss_sum"] / max(values["count"], 1.0),
        "value_clip_fraction": values["value_clip_fraction"] / tokens,
        "value_error": values["value_error"] / tokens,
    }
