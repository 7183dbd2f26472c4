"""Train/rollout mismatch: the rollout engine's log-probs differ from the trainer's (kernels,
precision, batch shapes), so the samples are slightly off-policy. Two corrections, per token,
with w_t = exp(log pi_old,train - log pi_rollout):

- Truncated importance sampling (TIS, Yao et al. 2025): multiply the policy loss by
  clip(w_t, low, high), a stop-gradient weight (low 0 and high C is the paper's min(w, C)).
- ICEPOP (Ling team, 2025): drop tokens whose w_t falls outside [low, high] from the loss (mask
  them) instead of re-weighting.

:func:`mismatch_metrics` reports mean and max |log pi_train - log pi_rollout| over valid tokens.
"""

from __future__ import annotations

import torch


def _valid(response_mask):
    return response_mask.bool()


def tis_weights(old_log_probs, rollout_log_probs, response_mask, low: float, high: float):
    """``[B, T]`` weights clip(w, low, high) (0 where masked) and the fraction truncated."""
    mask = _valid(response_mask)
    zero = torch.zeros((), dtype=old_log_probs.dtype)
    ratio = torch.exp(torch.where(mask, old_log_probs - rollout_log_probs, zero))
    weights = torch.clamp(ratio, low, high)
    truncated = (weights != ratio) & mask
    fraction = truncated.sum() / mask.sum().clamp(min=1)
    return torch.where(mask, weights, zero).detach(), {"tis_truncated_fraction": fraction.to(old_log_probs.dtype)}


def icepop_mask(old_log_probs, rollout_log_probs, response_mask, low: float, high: float):
    """The response mask with the tokens whose w leaves [low, high] removed, and their fraction."""
    mask = _valid(response_mask)
    zero = torch.zeros((), dtype=old_log_probs.dtype)
    ratio = torch.exp(torch.where(mask, old_log_probs - rollout_log_probs, zero))
    keep = mask & (ratio >= low) & (ratio <= high)
    fraction = (mask & ~keep).sum() / mask.sum().clamp(min=1)
    return keep.to(response_mask.dtype), {"icepop_masked_fraction": fraction.to(old_log_probs.dtype)}


def mismatch_metrics(train_log_probs, rollout_log_probs, response_mask) -> dict[str, torch.Tensor]:
    """Mean and max |log pi_train - log pi_rollout| over valid tokens (0-d tensors)."""
    mask = _valid(response_mask)
    difference = torch.where(mask, (train_log_probs - rollout_log_probs).abs(), torch.zeros((), dtype=train_log_probs.dtype))
    return {
        "logprob_mismatch_mean": difference.sum() / mask.sum().clamp(min=1),
        "logprob_mismatch_max": difference.max(),
    }
