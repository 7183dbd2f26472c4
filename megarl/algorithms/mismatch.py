"""Train/rollout mismatch: the rollout engine's log-probs differ from the trainer's (other kernels,
precision, batch shapes, MoE routing), so even "on-policy" samples are slightly off-policy. Both
corrections below are per-token, stop-gradient weights on the policy loss, with

    w_t = pi_old,train(a_t) / pi_rollout(a_t) = exp(old_log_probs - rollout_log_probs)

(old_log_probs: the trainer's forward at the start of the step). The caller multiplies:
``per_token_loss * weights`` before :func:`megarl.algorithms.aggregation.aggregate_loss`.

- Truncated importance sampling (TIS, Yao et al. 2025): weight clip(w_t, low, high). With low = 0
  and high = C this is the paper's min(w_t, C); low > 0 also bounds it from below.
- ICEPOP (Ling team, "IcePop", 2025): weight M(w_t) = w_t if low <= w_t <= high, else 0: tokens
  whose engines disagree too much leave the loss, the others are importance-corrected (the paper's
  M, as OpenRLHF's ``use_icepop``). A weight of 0 removes the token's gradient but the token still
  counts in the aggregation normaliser (as in OpenRLHF); to drop it from the normaliser too, use
  ``weights > 0`` as the response mask for both.

Metrics are detached 0-d tensors over valid tokens.
"""

from __future__ import annotations

import torch

from megarl.algorithms.aggregation import masked_mean
from megarl.algorithms.kl import LOG_RATIO_LIMIT


def _train_rollout_ratio(old_log_probs, rollout_log_probs, response_mask) -> torch.Tensor:
    """w = exp(clamp(old - rollout, +-20)) on valid tokens, 1 where masked: ``[B, T]``."""
    log_ratio = torch.where(response_mask.bool(), old_log_probs - rollout_log_probs, 0.0)
    return torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)).detach()


def tis_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    low: float,
    high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights clip(w, low, high).

    Args:
        old_log_probs: ``[B, T]``, the trainer's log pi_old.
        rollout_log_probs: ``[B, T]``, the engine's log-probs of the same tokens.
        response_mask: ``[B, T]``.
        low, high: bounds of the weight (``algorithm.tis_threshold_low/high``).

    Returns:
        ``(weights [B, T], metrics)``: weights detached, 0 where masked; ``tis_clipped_fraction_low``
        and ``_high`` (w below ``low`` / above ``high``), ``tis_weight_mean``.
    """
    mask = response_mask.bool()
    ratio = _train_rollout_ratio(old_log_probs, rollout_log_probs, response_mask)
    weights = torch.where(mask, torch.clamp(ratio, low, high), 0.0)
    metrics = {
        "tis_clipped_fraction_low": masked_mean((ratio < low).to(ratio.dtype), response_mask),
        "tis_clipped_fraction_high": masked_mean((ratio > high).to(ratio.dtype), response_mask),
        "tis_weight_mean": masked_mean(weights, response_mask),
    }
    return weights, metrics


def icepop_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    low: float,
    high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ICEPOP's masked importance weights: w where low <= w <= high, 0 elsewhere.

    Args:
        old_log_probs: ``[B, T]``, the trainer's log pi_old.
        rollout_log_probs: ``[B, T]``, the engine's log-probs of the same tokens.
        response_mask: ``[B, T]``.
        low, high: the kept band of w (``algorithm.icepop_low/high``).

    Returns:
        ``(weights [B, T], metrics)``: weights detached, 0 where masked or outside the band;
        ``icepop_masked_fraction_low`` and ``_high`` (w below / above the band).
    """
    mask = response_mask.bool()
    ratio = _train_rollout_ratio(old_log_probs, rollout_log_probs, response_mask)
    below, above = ratio < low, ratio > high
    weights = torch.where(mask & ~below & ~above, ratio, 0.0)
    metrics = {
        "icepop_masked_fraction_low": masked_mean(below.to(ratio.dtype), response_mask),
        "icepop_masked_fraction_high": masked_mean(above.to(ratio.dtype), response_mask),
    }
    return weights, metrics


def mismatch_metrics(
    train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the engine's log-probs are from the trainer's, over valid tokens.

    With d_t = log pi_train - log pi_rollout: ``logprob_diff_abs_mean`` mean |d|,
    ``logprob_diff_abs_max`` max |d|, ``rollout_kl`` the k3 estimate of KL(pi_rollout || pi_train)
    from the rollout's own samples, mean of exp(d) - 1 - d.

    Args:
        train_log_probs, rollout_log_probs, response_mask: ``[B, T]``.

    Returns:
        Detached 0-d tensors (0 when nothing is valid; ``[B, T]`` must not be empty).
    """
    mask = response_mask.bool()
    difference = torch.where(mask, train_log_probs - rollout_log_probs, 0.0).detach()
    bounded = difference.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return {
        "logprob_diff_abs_mean": masked_mean(difference.abs(), response_mask),
        "logprob_diff_abs_max": difference.abs().amax(),
        "rollout_kl": masked_mean(torch.exp(bounded) - 1 - bounded, response_mask),
    }
