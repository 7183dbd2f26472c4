"""What a model under training optimises: the objective protocol, and a micro-batch's share of a loss.

The policy and the critic are objectives. :meth:`megarl.trainer.model.TrainModel.update` trains a
model on one: it cuts every mini-batch into micro-batches carrying the token values the objective
names (``fields``), runs them through Megatron's schedule with the model's one forward step, and on
the last pipeline stage hands each micro-batch and the model's output for it to the objective's
``loss``, which returns

    (loss_sum, count, {metric: sum})

``loss_sum`` is the sum of the micro-batch's loss contributions and ``count`` its share of the
loss normaliser (:func:`aggregate_micro_batch`); Megatron adds the counts of the mini-batch and
divides the summed gradients by the total (``docs/rl_step.md``, "Aggregation"). Each metric is a
sum over the micro-batch's valid response tokens. The model adds ``loss_sum``, ``count``, the valid
tokens and every metric over the mini-batch's micro-batches and ranks, *by name*, and reports
``loss = sum(loss_sum) / sum(count)`` and each metric as its mean over the mini-batch's valid
tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from megarl.algorithms.aggregation import aggregate_loss, normalizer

if TYPE_CHECKING:
    from megarl.trainer.model import TrainModel


class Objective(Protocol):
    """The loss a :class:`~megarl.trainer.model.TrainModel` update minimises, and the metrics it reports."""

    fields: tuple[str, ...]
    """The batch's token values the loss reads (``TrainBatch.token_values`` names), cut into every
    micro-batch beside ``tokens``, ``labels``, ``response_mask`` and ``row_response_mask``."""

    metrics: tuple[str, ...]
    """The names of the token sums ``loss`` reports, each averaged over the valid tokens."""

    def loss(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's loss on the last pipeline stage.

        Args:
            micro: the micro-batch on the device (:meth:`TrainModel.micro_batches`): the model's
                inputs (``labels``), and the per-token values the loss reads (``response_mask``
                and ``fields``) as ``[b, s]`` grids, this context-parallel rank's tokens.
            output: what the model's output layer made of the model's inputs: for the policy the
                last hidden states ``[b', s', H]`` (with its hidden-states head) or the
                vocab-parallel logits ``[b', s', V / TP]``, for the critic the values
                ``[b', s', 1]``; ``[1, T]`` for a packed micro-batch, which
                :func:`megarl.trainer.packing.to_grid` turns into the grid.

        Returns:
            ``(loss_sum, count, sums)``: a differentiable 0-d loss sum, its share of the normaliser
            (0-d int, Megatron's ``num_tokens``), and for each name in :attr:`metrics` a 0-d sum over
            the micro-batch's valid tokens.
        """
        ...


class ModelObjective:
    """Base of the objectives that own the model they train (the policy, the critic): what the run
    reads of that model's training state, without reaching into it."""

    model: TrainModel

    @property
    def consecutive_skips(self) -> int:
        """Optimizer steps skipped in a row for non-finite gradients (part of the train state)."""
        return self.model.consecutive_skips

    @consecutive_skips.setter
    def consecutive_skips(self, value: int) -> None:
        self.model.consecutive_skips = value


def aggregate_micro_batch(
    per_token_loss: torch.Tensor, micro: dict[str, torch.Tensor], mode: str, max_response_length: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's ``(loss_sum, count)`` for Megatron's per-token loss normalisation.

    ``loss_sum`` is the sum of the micro-batch's contributions under ``mode``
    (:func:`megarl.algorithms.aggregation.aggregate_loss` with a normaliser of 1) and ``count`` its
    share of the normaliser Z. With context parallelism this rank holds part of each response: the
    whole rows' masks (``micro["row_response_mask"]``) give the per-response token counts, and the
    first context-parallel rank alone counts Z, so that the sum over ranks is the mini-batch's.

    Args:
        per_token_loss: ``[b, s]`` on this rank's columns.
        micro: the micro-batch (``response_mask``, ``row_response_mask``).
        mode: ``algorithm.loss_agg_mode``.
        max_response_length: L of the ``seq-mean-token-sum-norm`` normaliser.
        cp_rank: this rank in the context-parallel group.

    Returns:
        ``(loss_sum, count)``: a differentiable 0-d tensor, and a 0-d int tensor.
    """
    row_mask = micro["row_response_mask"]
    loss_sum = aggregate_loss(per_token_loss, micro["response_mask"], mode, 1.0, sequence_lengths=row_mask.sum(-1))
    count = normalizer(mode, row_mask, max_response_length) if cp_rank == 0 else torch.zeros((), dtype=torch.float64)
    return loss_sum, count.to(device=loss_sum.device, dtype=torch.int)
