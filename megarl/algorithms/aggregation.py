"""Loss aggregation: per-token losses ``[B, T]`` -> one scalar, correct across micro-batches and
data-parallel ranks.

A mini-batch is split into micro-batches and over data-parallel ranks; the gradient of the
mini-batch loss must not depend on that split. So every mode is a *sum* over this micro-batch
divided by a *global* normaliser computed once from the whole mini-batch (all micro-batches, all
DP ranks: the trainer all-reduces it). Summing the micro-batch losses (and the DP gradients) then
gives exactly the full-batch loss, with no per-micro-batch mean.

With l_{i,t} the per-token loss, m_{i,t} the response mask, |i| = sum_t m_{i,t}, N the valid
tokens and S the responses with at least one valid token in the mini-batch, L the maximum response
length:

- ``token-mean``:              sum_{i,t} m l / N
- ``seq-mean-token-sum``:      sum_i (sum_t m l) / S
- ``seq-mean-token-mean``:     sum_i (sum_t m l / |i|) / S
- ``seq-mean-token-sum-norm``: sum_i (sum_t m l) / (S L)   (Dr. GRPO's constant normaliser; verl
  divides by L only, which makes the loss scale with the batch size.)
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def normalizer(mode: str, response_mask: torch.Tensor, max_response_length: int) -> torch.Tensor:
    """This rank's part of the global denominator of ``mode`` (a 0-d float64 tensor); the trainer
    sums it over the mini-batch's micro-batches and all-reduces it over data-parallel ranks.

    Args:
        mode: one of :data:`MODES`.
        response_mask: ``[B, T]`` of every sample this rank trains on in the mini-batch.
        max_response_length: L, the configured response budget.
    """
    mask = response_mask.bool()
    if mode == "token-mean":
        return mask.sum().double()
    sequences = (mask.sum(-1) > 0).sum().double()
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return sequences
    if mode == "seq-mean-token-sum-norm":
        return sequences * max_response_length
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(MODES)}")


def aggregate_loss(per_token_loss: torch.Tensor, response_mask: torch.Tensor, mode: str, global_normalizer) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss under ``mode`` (see the module docstring).

    Args:
        per_token_loss: ``[B, T]``; values at masked positions are never read.
        response_mask: ``[B, T]``.
        mode: one of :data:`MODES`.
        global_normalizer: :func:`normalizer` summed over the whole mini-batch (all DP ranks).
    """
    if mode not in MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(MODES)}")
    mask = response_mask.bool()
    masked = torch.where(mask, per_token_loss, torch.zeros((), dtype=per_token_loss.dtype))
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(-1).clamp(min=1).to(per_token_loss.dtype)
        total = (masked.sum(-1) / lengths).sum()
    else:
        total = masked.sum()
    return total / torch.as_tensor(global_normalizer, dtype=per_token_loss.dtype)
