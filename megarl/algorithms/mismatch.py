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
alternatives, and sequence-level importance sampling (below) is a fourth: the config refuses any
two of them (w_t twice).
The weight composes with any token-level loss: with ``cispo`` the update direction is
-sg(clip(u_t) w_t) A grad log pi_theta, the clip acting on the proximal ratio only. ``gspo`` is
refused: its ratio is one per sequence and a per-token behaviour weight would mix the two levels.

Sequence-level importance sampling (verl's ``algorithm.rollout_correction.rollout_is``; "When Speed
Kills Stability", Li et al. 2025). One weight per sequence i from the same
token log-ratios log w_t = old_log_probs - rollout_log_probs over its valid tokens T_i, truncated
at C (``algorithm.rollout_is_threshold``) and put on each of its tokens, stop-gradient:

    sequence:   rho_i = min(exp(clamp(sum_{t in T_i} log w_t, +-20)), C)            (product of w_t)
    geometric:  rho_i = min(exp(clamp(mean_{t in T_i} log w_t, +-20)), C)           (geometric mean)

The product is the unbiased sequence importance ratio, with a variance that grows with the length;
the geometric mean is a length-normalised, biased, low-variance form. Being one weight per
sequence, it also composes with ``gspo``. Source: verl's
``compute_rollout_correction_weights`` (rollout_corr_helper.py, rollout_is = "sequence") and, for
``geometric``, the level of the same name in its earlier ``compute_rollout_importance_weights``
(mismatch_helper.py, verl 0.6).

Rejection sampling (verl's ``rollout_rs``; the trust-region masking of Li et al. 2025) takes tokens
or whole sequences out of the loss where the engines disagree too much, measured by an estimator of
the divergence per token (verl's names):

    k1_t = -log w_t,    k2_t = (log w_t)^2 / 2,    k3_t = w_t - 1 - log w_t     (log w_t clamped to +-20)

A criterion is ``token_k{1,2,3}`` (each token on its own) or ``seq_{sum,mean,max}_k{1,2,3}``
(one statistic per sequence, over its valid tokens, deciding for all of them; no ``seq_max_k1``, as
in verl). k2 and k3 are >= 0: kept when the statistic <= U (``algorithm.rollout_rs_threshold``).
k1 is signed: kept when log L <= statistic <= log U (L: ``algorithm.rollout_rs_threshold_lower``,
1/U by default), i.e. exp(k1), the rollout-to-train probability ratio (its product or geometric
mean for ``seq_sum`` / ``seq_mean``), lies in [L, U]. Rejected tokens leave ``response_mask``: no
gradient and no place in any normaliser (as verl, unlike ICEPOP's weight of 0). Source: verl's
``compute_rollout_rejection_mask``.

Departures from verl, all deliberate: one rejection criterion per run (verl chains several, comma
separated); k1's bounds are two numbers (verl: one ``"lower_upper"`` string); verl's "token" level
of importance sampling is ``algorithm.tis`` here; the sequence fractions and extremes of the
metrics count the sequences with at least one valid token (verl: every row, empty ones included);
``rollout_is_min`` is bounded below by exp(-20) as the weight is (verl's is not); the metrics are a subset of verl's, with its names, under ``mismatch/`` (verl: ``rollout_corr/``).

Metrics are detached 0-d tensors over valid tokens, or over valid sequences where they say so.
"""

from __future__ import annotations

import math

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


ROLLOUT_IS_LEVELS = ("sequence", "geometric")
"""The sequence-level importance sampling weights (``algorithm.rollout_is``)."""

ROLLOUT_RS_CRITERIA = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
"""The rejection sampling criteria (``algorithm.rollout_rs``), verl's names."""


def _valid_sequences(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the sequences with at least one valid token."""
    return response_mask.bool().any(dim=-1)


def _valid_max_min(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and smallest of ``values`` where ``valid`` (same shape), both 0 when none is."""
    if not valid.any():
        return values.new_zeros(()), values.new_zeros(())
    return torch.where(valid, values, -math.inf).amax(), torch.where(valid, values, math.inf).amin()


def _sequence_log_ratio_sum(old_log_probs, rollout_log_probs, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of old - rollout over each sequence's valid tokens and their count, both ``[B]``."""
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_log_probs - rollout_log_probs, 0.0).detach()
    return log_ratio.sum(dim=-1), mask.sum(dim=-1)


def sequence_is_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str,
    threshold: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level truncated importance weights: the product (``sequence``) or geometric mean
    (``geometric``) of a sequence's w_t, at most ``threshold``, on each of its valid tokens.

    Args:
        old_log_probs: ``[B, T]``, the trainer's log pi_old.
        rollout_log_probs: ``[B, T]``, the engine's log-probs of the same tokens.
        response_mask: ``[B, T]``.
        level: ``sequence`` or ``geometric`` (``algorithm.rollout_is``).
        threshold: the truncation C > 0 (``algorithm.rollout_is_threshold``).

    Returns:
        ``(weights [B, T], metrics)``: weights detached, 0 where masked. Metrics (verl's), from the
        weight before truncation rho'_i = exp(clamp(log rho_i, +-20)): ``rollout_is_mean`` (over
        valid tokens), ``rollout_is_max`` and ``_min`` (over valid sequences),
        ``rollout_is_ratio_fraction_high`` and ``_low`` (sequences with rho'_i above C / below 1/C),
        ``rollout_is_eff_sample_size`` (1 / mean over valid tokens of (v / mean v)^2, with v =
        rho'_i clamped to [1/C, C]). Every metric is 0 when nothing is valid.
    """
    if level not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"rollout importance sampling level {level!r} is not one of {ROLLOUT_IS_LEVELS}")
    mask = response_mask.bool()
    log_sum, counts = _sequence_log_ratio_sum(old_log_probs, rollout_log_probs, response_mask)
    log_weight = log_sum if level == "sequence" else log_sum / counts.clamp(min=1)
    untruncated = torch.exp(log_weight.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    weights = torch.where(mask, untruncated.clamp(max=threshold)[:, None], 0.0)

    valid = _valid_sequences(response_mask)
    per_token = untruncated[:, None].expand_as(weights)
    bounded = per_token.clamp(1 / threshold, threshold)
    normalised = bounded / (masked_mean(bounded, response_mask) + 1e-8)
    second_moment = masked_mean(normalised.square(), response_mask)
    sequences = valid.sum().clamp(min=1)
    largest, smallest = _valid_max_min(untruncated, valid)
    metrics = {
        "rollout_is_mean": masked_mean(per_token, response_mask),
        "rollout_is_max": largest,
        "rollout_is_min": smallest,
        "rollout_is_ratio_fraction_high": (valid & (log_weight > math.log(threshold))).sum() / sequences,
        "rollout_is_ratio_fraction_low": (valid & (log_weight < -math.log(threshold))).sum() / sequences,
        "rollout_is_eff_sample_size": second_moment.reciprocal() if valid.any() else second_moment,
    }
    return weights, metrics


def _token_divergence(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """k1, k2 or k3 of the mismatch per token from log w (already clamped)."""
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(log_ratio) - 1 - log_ratio


def rejection_mask(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    criterion: str,
    upper: float,
    lower: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rejection sampling: which tokens stay in the loss under ``criterion``.

    Args:
        old_log_probs: ``[B, T]``, the trainer's log pi_old.
        rollout_log_probs: ``[B, T]``, the engine's log-probs of the same tokens.
        response_mask: ``[B, T]``.
        criterion: a name in :data:`ROLLOUT_RS_CRITERIA` (``algorithm.rollout_rs``).
        upper: U > 0 (``algorithm.rollout_rs_threshold``): k2 / k3 statistics above it, and k1
            statistics above log U, are rejected.
        lower: k1 only, L > 0 (``algorithm.rollout_rs_threshold_lower``): statistics below log L
            are rejected; None is 1/U.

    Returns:
        ``(keep [B, T] bool, metrics)``: ``keep`` is false where masked or rejected. Metrics (verl's
        names, with s the criterion's statistic, per token or per sequence):
        ``rollout_rs_masked_fraction`` (valid tokens rejected), ``rollout_rs_seq_masked_fraction``
        (valid sequences with a rejected token), ``rollout_rs_<criterion>_mean`` (s over valid
        tokens, a sequence's s counting once per token), ``_max``, ``_min`` and ``_fraction_high``
        (s above its upper bound), and for k1 ``_fraction_low``: over valid tokens (token_*) or
        valid sequences (seq_*). Every metric is 0 when nothing is valid.
    """
    if criterion not in ROLLOUT_RS_CRITERIA:
        raise ValueError(f"rejection sampling criterion {criterion!r} is not one of {ROLLOUT_RS_CRITERIA}")
    estimator = criterion[-2:]
    if lower is not None and estimator != "k1":
        raise ValueError(f"rejection sampling criterion {criterion!r} has no lower bound (only k1 criteria do); pass lower=None")
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_log_probs - rollout_log_probs, 0.0).detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    divergence = torch.where(mask, _token_divergence(log_ratio, estimator), 0.0)
    if criterion.startswith("token_"):
        statistic, valid = divergence, mask
    elif criterion.startswith("seq_sum_"):
        statistic, valid = divergence.sum(dim=-1), _valid_sequences(response_mask)
    elif criterion.startswith("seq_mean_"):
        statistic, valid = divergence.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1), _valid_sequences(response_mask)
    else:
        statistic, valid = torch.where(mask, divergence, -math.inf).amax(dim=-1), _valid_sequences(response_mask)
        statistic = torch.where(valid, statistic, 0.0)
    high_bound = math.log(upper) if estimator == "k1" else upper
    above = statistic > high_bound
    below = statistic < math.log(lower if lower is not None else 1 / upper) if estimator == "k1" else torch.zeros_like(above)
    rejected = above | below
    keep = mask & ~(rejected if rejected.dim() == 2 else rejected[:, None])

    count = valid.sum().clamp(min=1)
    per_token = statistic if statistic.dim() == 2 else statistic[:, None].expand_as(divergence)
    prefix = f"rollout_rs_{criterion}"
    largest, smallest = _valid_max_min(statistic, valid)
    metrics = {
        "rollout_rs_masked_fraction": masked_mean((mask & ~keep).to(divergence.dtype), response_mask),
        "rollout_rs_seq_masked_fraction": (mask & ~keep).any(dim=-1).sum() / _valid_sequences(response_mask).sum().clamp(min=1),
        f"{prefix}_mean": masked_mean(per_token, response_mask),
        f"{prefix}_max": largest,
        f"{prefix}_min": smallest,
        f"{prefix}_fraction_high": (valid & above).sum() / count,
    }
    if estimator == "k1":
        metrics[f"{prefix}_fraction_low"] = (valid & below).sum() / count
    return keep, metrics
