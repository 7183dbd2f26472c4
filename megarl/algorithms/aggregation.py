"""Loss aggregation: per-token losses ``[B, T]`` -> the scalar to minimise, exact across
micro-batches, data-parallel and context-parallel ranks.

A mini-batch (one optimizer step) is split over data-parallel ranks and, on each rank, into
micro-batches of different sizes and padded lengths. The gradient of the mini-batch loss must not
depend on that split, so no mode takes a per-micro-batch mean. Every mode is a *sum* over this
micro-batch's tokens divided by a *global* normaliser of the whole mini-batch:

    loss_micro = sum_{i in micro} c_i / Z,   so   sum over micro-batches and ranks of loss_micro = loss.

With l_{i,t} the per-token loss, m_{i,t} the mask, |i| = sum_t m_{i,t} (the full response's valid
tokens), N = sum_i |i| the mini-batch's valid tokens, S the number of its responses with at least
one valid token, L the maximum response length (the configured budget):

- ``token-mean``:              c_i = sum_t m l,          Z = N      (mean over all valid tokens; DAPO)
- ``seq-mean-token-sum``:      c_i = sum_t m l,          Z = S      (mean over responses of their sums)
- ``seq-mean-token-mean``:     c_i = (sum_t m l) / |i|,  Z = S      (mean over responses of their means)
- ``seq-mean-token-sum-norm``: c_i = sum_t m l,          Z = S * L  (Dr. GRPO's constant normaliser)
- ``token-sum``:               c_i = sum_t m l,          Z = 1      (the sum over all valid tokens)

Z is additive over responses, so :func:`normalizer` of each rank's share of the mini-batch (all of
its micro-batches) summed over data-parallel ranks (an all-reduce) is the global Z. A response
whose mask is all 0 (filtered out) counts in no denominator.

``seq-mean-token-sum-norm`` divides by S * L, Dr. GRPO's (1/G) sum_i (1/L) sum_t, as verl 0.9
does. The one difference is L: megarl's is ``data.max_response_length``, a constant over the run
as Dr. GRPO means it; verl's default is the width of the batch's response mask (its padded
response length), which can change from step to step.

``token-sum`` is verl's mode of that name: the mini-batch's loss is the plain sum of its valid
tokens' losses, so its scale grows with the batch and the response lengths (pick the learning rate
for it). Its Z is 1 for the whole mini-batch, which no additive share expresses: :func:`normalizer`
gives 0 for every part and :func:`aggregate_loss` divides by max(Z, 1) = 1, so each micro-batch
contributes its plain sum; Megatron, whose total count is then 0, leaves the summed gradients
unscaled (it divides only by a positive count), which is the gradient of the sum.

What the caller must know:

- Compute Z from the mask the loss uses (after ICEPOP or overlong filtering if they change it), on
  full responses: with context parallelism a rank holds a shard of each response, so compute Z
  before sharding and all-reduce it over data-parallel ranks only, and pass each response's full
  ``sequence_lengths`` to :func:`aggregate_loss` for ``seq-mean-token-mean``.
- The identity above is a *sum* over micro-batches and ranks. megarl builds its models with
  Megatron's ``calculate_per_token_loss=True`` and returns ``(loss_sum, count, metrics)`` from each
  micro-batch (:mod:`megarl.trainer.model`): Megatron then sums over micro-batches and ranks and
  divides by the total count itself, so no rescaling by the micro-batch or data-parallel count is
  needed (a ``(loss, metrics)`` loss would be divided by the number of micro-batches and averaged
  over data x context ranks instead).
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(MODES)}")


def normalizer(mode: str, response_mask: torch.Tensor, max_response_length: int) -> torch.Tensor:
    """The denominator Z of ``mode`` for a set of responses (see the module docstring).

    Args:
        mode: one of :data:`MODES`.
        response_mask: ``[B, T]`` of every response this rank trains on in the mini-batch (all its
            micro-batches, full responses). Z is additive over responses: the sum of the values of
            the micro-batches' masks is the same.
        max_response_length: L, the configured response length budget.

    Returns:
        A 0-d float64 tensor on the mask's device: N, S or S * L, and 0 for ``token-sum`` (whose
        global Z of 1 is :func:`aggregate_loss`'s floor). Sum it over data-parallel ranks
        (all-reduce) to get the global Z.
    """
    _check_mode(mode)
    mask = response_mask.bool()
    if mode == "token-sum":
        return torch.zeros((), dtype=torch.float64, device=mask.device)
    if mode == "token-mean":
        return mask.sum().double()
    responses = mask.any(-1).sum().double()
    if mode == "seq-mean-token-sum-norm":
        return responses * max_response_length
    return responses


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    global_normalizer: torch.Tensor | float,
    *,
    sequence_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share sum_{i in micro} c_i / Z of the mini-batch loss under ``mode``.

    Args:
        per_token_loss: ``[B, T]``; masked positions are never read.
        response_mask: ``[B, T]``.
        mode: one of :data:`MODES`.
        global_normalizer: Z, :func:`normalizer` summed over the whole mini-batch (all
            micro-batches, all data-parallel ranks). It is floored at 1: a Z of 0 (nothing to
            train on, or ``token-sum``) leaves the plain sum.
        sequence_lengths: ``[B]`` |i| for ``seq-mean-token-mean`` when this rank holds only part of
            each response (context parallelism); by default the mask's row sums.

    Returns:
        A 0-d tensor in ``per_token_loss``'s dtype, differentiable.
    """
    _check_mode(mode)
    mask = response_mask.bool()
    masked = torch.where(mask, per_token_loss, 0.0)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(-1) if sequence_lengths is None else sequence_lengths
        total = (masked.sum(-1) / lengths.clamp(min=1).to(masked.dtype)).sum()
    else:
        total = masked.sum()
    denominator = torch.as_tensor(global_normalizer, device=masked.device).clamp(min=1)
    return total / denominator.to(masked.dtype)


def masked_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """sum(m v) / max(sum(m), 1) over all valid tokens, never reading masked values (for metrics).

    Args:
        values, response_mask: ``[B, T]``.

    Returns:
        A 0-d tensor in ``values``' dtype (0 when nothing is valid).
    """
    mask = response_mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
