"""Train/rollout mismatch and stale samples: the rollout engine's log-probs differ from the trainer's (other kernels,
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

Decoupled PPO (AReaL, Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning
System") separates three policies: pi_behav, the engine's policy that sampled the tokens (its
log-probs are ``rollout_log_probs``; in asynchronous RL it may be several weight versions old),
pi_prox, the proximal policy the update is kept close to, and pi_theta, the policy being trained.
Its objective per token is

    J_t = w_t * min(u_t A_t, clip(u_t, 1 - eps_low, 1 + eps_high) A_t),
    u_t = pi_theta(a_t) / pi_prox(a_t),   w_t = pi_prox(a_t) / pi_behav(a_t),

so that w_t u_t = pi_theta / pi_behav is the full importance ratio, the trust region is on u_t
alone, and w_t is a constant (no gradient). Here pi_prox is the trainer's own forward with the
current weights before the update, ``old_log_probs``: the ratio r_t of
:mod:`megarl.algorithms.policy_losses` already is u_t, and w_t is the same
exp(old_log_probs - rollout_log_probs) as above. :func:`decoupled_weights` truncates it as AReaL
does: a token whose w_t exceeds the cap C (``algorithm.behav_imp_weight_cap``) gets weight 0 (it
leaves the gradient and, as with ICEPOP, still counts in the normaliser); C = None keeps every w_t.
With pi_behav = pi_prox, w_t = 1 and the loss is plain PPO exactly.

TIS and ICEPOP are therefore decoupled PPO with another truncation of the same w_t (clipped to
[low, high], or masked outside a band) and keep working unchanged for stale samples. The three are
alternatives: the config refuses ``use_decoupled_loss`` with ``tis`` or ``icepop`` (w_t twice).
The weight composes with any token-level loss: with ``cispo`` the update direction is
-sg(clip(u_t) w_t) A grad log pi_theta, the clip acting on the proximal ratio only. ``gspo`` is
refused: its ratio is one per sequence and a per-token behaviour weight would mix the two levels.

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


def decoupled_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cap: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO's behaviour importance weights w = pi_prox / pi_behav, 0 above ``cap``.

    Args:
        old_log_probs: ``[B, T]``, the trainer's log pi_prox (its forward before the update).
        rollout_log_probs: ``[B, T]``, the engine's log pi_behav of the same tokens.
        response_mask: ``[B, T]``.
        cap: tokens with w > cap get weight 0 (``algorithm.behav_imp_weight_cap``); None: no cap.

    Returns:
        ``(weights [B, T], metrics)``: weights detached, 0 where masked or capped;
        ``behav_imp_weight_mean`` (of the weights applied) and ``behav_imp_weight_capped_fraction``.
    """
    mask = response_mask.bool()
    ratio = _train_rollout_ratio(old_log_probs, rollout_log_probs, response_mask)
    capped = mask & (ratio > cap) if cap is not None else torch.zeros_like(mask)
    weights = torch.where(mask & ~capped, ratio, 0.0)
    metrics = {
        "behav_imp_weight_mean": masked_mean(weights, response_mask),
        "behav_imp_weight_capped_fraction": masked_mean(capped.to(ratio.dtype), response_mask),
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
