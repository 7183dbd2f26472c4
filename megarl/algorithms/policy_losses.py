"""Policy losses: ``@register_policy_loss(name)`` per-token losses to MINIMISE.

Every policy loss takes, all ``[B, T]``, ``log_probs`` (log pi of the sampled tokens under the
policy being trained, differentiable), ``old_log_probs`` (the same under pi_old, the policy at the
start of the step), ``advantages`` and ``response_mask``, plus keyword-only clip settings, and
returns ``(per_token_loss [B, T], metrics)``. Masked positions are never read and their loss is 0.
Aggregation over tokens is separate (:mod:`megarl.algorithms.aggregation`), and so are the
train/rollout corrections (:mod:`megarl.algorithms.mismatch`: multiply ``per_token_loss`` by their
weights; with ``algorithm.use_decoupled_loss`` pi_old is decoupled PPO's proximal policy and
the weight its behaviour importance weight). With r_t = pi(a_t) / pi_old(a_t) and A_t the advantage:

- ``ppo`` (Schulman et al. 2017) with clip-higher (DAPO, Yu et al. 2025) and dual clip (Ye et al.
  2020): l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); with a dual-clip bound c and
  A < 0, l_t = min(l_t, -A c) (as verl: only negative advantages are dual-clipped).
- ``gspo`` (Zheng et al. 2025): the sequence ratio s_i = exp(mean_t log r_{i,t}) replaces r_t in the
  same clipped surrogate. Gradients flow per token through s_{i,t} = sg(s_i) pi_t / sg(pi_t)
  (GSPO-token), so d l_t / d log pi_t = -A sg(s_i) on unclipped tokens. With the
  ``seq-mean-token-mean`` aggregation this is exactly the paper's sequence-level objective. The
  paper's clip ranges are tiny (3e-4, 4e-4). Departure: dual clip is available here too (the
  paper has none; leave ``clip_ratio_c`` None for the paper). s_i needs all of response i on this
  rank: under context parallelism, where a rank holds a shard of each response, it is not exact.
- ``cispo`` (MiniMax-M1, 2025): l_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi: the clipped
  importance weight scales the REINFORCE gradient and never zeroes it. The paper clips only above
  (pass clip_ratio_low close to 1 for that); a dual clip has no meaning here and is refused.
- ``gpg`` (GPG, Chu et al. 2025; verl ``compute_policy_loss_gpg``): l_t = -A log pi_t, plain
  REINFORCE: no ratio, no clip, no metrics.
- ``sapo`` (SAPO, Gao et al. 2025, arXiv 2511.20347; verl ``compute_policy_loss_sapo``): a soft
  gate replaces the clip, l_t = -A f_tau(r) with f_tau(r) = (4 / tau) sigmoid(tau (r - 1)),
  tau = tau_pos where A > 0 and tau_neg otherwise. Its gradient -A 4 sigma (1 - sigma) r equals
  PPO's -A r at r = 1 and fades smoothly away from it. verl always aggregates SAPO with
  ``seq-mean-token-mean``; here the aggregation is ``algorithm.loss_agg_mode`` (set
  seq-mean-token-mean to match).
- ``gmpo`` (GMPO, Zhao et al. 2025, arXiv 2507.20673; verl ``compute_policy_loss_geo_mean``): the
  geometric mean of the token ratios, clipped per token in log space. With x_t = log r_t and
  s = sign(A_i), x'_t = s min(s x_t, s clip(x_t, -eps_low, eps_high)) (a clip on the side that
  would grow the objective only), rho_i = exp(mean_t x'_t), A_i = mean_t A_t and the sequence loss
  l_i = -A_i rho_i, put on each of response i's valid tokens: ``seq-mean-token-mean`` aggregation
  gives verl's mean over responses (verl ignores its loss_agg_mode for GMPO).
- ``dppo_tv`` and ``dppo_kl`` (DPPO, "Rethinking the Trust Region in LLM RL", arXiv 2602.04879;
  verl ``compute_policy_loss_dppo_tv`` / ``_dppo_kl``): a trust region on the sampled token's
  probability p = pi(a), q = pi_old(a), instead of a clip on the ratio. A token outside the
  region has loss 0 (no gradient); inside, l_t = -A sg(min(r, c)) log pi_t, with c =
  ``clip_ratio_c`` (no truncation when None). TV: inside when p - q <= eps_high (A > 0) or
  p - q >= -eps_low (A <= 0). KL: with the binary KL D = q log(q / p) + (1 - q) log((1 - q + 1e-8) /
  (1 - p + 1e-8)), inside when D <= eps_high or p <= q (A > 0), D <= eps_low or p >= q (A <= 0).
  eps_low / eps_high are ``clip_ratio_low`` / ``clip_ratio_high``, read as divergence bounds.
- ``clip_cov`` and ``kl_cov`` (Cui et al. 2025): in :mod:`megarl.algorithms.covariance_losses`, which
  registers them here.

Before exp, as verl 0.9 does: the token log-ratio (ppo, cispo) is clamped to [-20, 20]; GSPO's
log-ratio sg(log s_i) + log pi_t - sg(log pi_t) is clamped above at 10 only (no gradient past
it), so one response cannot overflow the loss.

Departures from verl, all deliberate: gmpo clamps the token log-ratio to [-20, 20] before its
clip (verl leaves the clamp commented out) and divides by |y_i|, not |y_i| + 1e-8; a response with
no valid token counts in no mean (verl's GMPO mean counts it, with loss 0); dppo's truncation is off
when ``clip_ratio_c`` is None (verl reads its actor's clip_ratio_c, 3.0 unless set; the paper
recommends a large value such as 20). verl's ``pg_clipfrac`` of gmpo counts every token whose
log-ratio lies outside the bounds; here ``clip_fraction_low/high`` count those the clip holds (no
gradient), as for ppo.

Metrics are detached 0-d tensors, means over valid tokens: ``clip_fraction_low`` (A < 0 and the
ratio is clipped at 1 - eps_low: no gradient), ``clip_fraction_high`` (A > 0, clipped at
1 + eps_high), ``dual_clip_fraction``, ``approx_kl`` (k3 estimate of KL(pi_old || pi):
r - 1 - log r with the token ratio r), ``ratio_mean`` (the ratio the loss uses); dppo reports
``trust_region_masked_fraction`` (tokens outside the region) and ``truncated_fraction`` (inside,
weight truncated at c) instead of the clip fractions; sapo and gmpo no dual clip fraction.
"""

from __future__ import annotations

import torch

from megarl.algorithms.aggregation import masked_mean
from megarl.algorithms.registry import Registry

LOG_RATIO_LIMIT = 20.0
"""Bound on |log pi - log pi_old| before exp (verl's value): exp(20) is 5e8, far past any clip."""

GSPO_LOG_RATIO_MAX = 10.0
"""Upper bound on GSPO's log-ratio before exp (verl's value; verl sets no lower bound)."""

POLICY_LOSSES: Registry = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


def policy_loss(name: str, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the policy loss registered as ``name`` (``algorithm.policy_loss``) with the ``inputs``
    it declares (see :meth:`megarl.algorithms.registry.Registry.call`)."""
    return POLICY_LOSSES.call(name, **inputs)


def sequence_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log sequence ratio: (1/|y_i|) sum_t (log pi_{i,t} - log pi_old_{i,t}) over valid tokens.

    Args:
        log_probs, old_log_probs, response_mask: ``[B, T]``.

    Returns:
        ``[B]``; 0 for a response without valid tokens. Differentiable in ``log_probs``.
    """
    mask = response_mask.bool()
    difference = torch.where(mask, log_probs - old_log_probs, 0.0)
    return difference.sum(-1) / mask.sum(-1).clamp(min=1)


def clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """PPO's per-token loss for a given ratio (see the module docstring) and its clip metrics."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_active = clipped > unclipped
    if clip_ratio_c is None:
        dual_active = torch.zeros_like(clipped_active)
    else:
        dual = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (dual < loss)
        loss = torch.where(dual_active, dual, loss)
    metrics = {
        "clip_fraction_low": masked_mean((clipped_active & (advantages < 0)).to(ratio.dtype), response_mask),
        "clip_fraction_high": masked_mean((clipped_active & (advantages > 0)).to(ratio.dtype), response_mask),
        "dual_clip_fraction": masked_mean(dual_active.to(ratio.dtype), response_mask),
    }
    return torch.where(response_mask.bool(), loss, 0.0), metrics


def token_log_ratio(log_probs, old_log_probs, response_mask):
    """log r_t = log pi - log pi_old, 0 where masked, clamped to +-LOG_RATIO_LIMIT: ``[B, T]``."""
    log_ratio = torch.where(response_mask.bool(), log_probs - old_log_probs, 0.0)
    return log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def ratio_metrics(log_ratio, ratio, response_mask) -> dict[str, torch.Tensor]:
    """``approx_kl`` (k3 of the token log-ratio ``log_ratio``) and ``ratio_mean`` (of the ratio the
    loss uses), means over the valid tokens, detached."""
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    return {
        "approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, response_mask),
        "ratio_mean": masked_mean(ratio, response_mask),
    }


@register_policy_loss("ppo")
def ppo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
):
    """Token-level clipped surrogate with clip-higher and optional dual clip.

    l_t = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)), then for A < 0
    l_t = min(l_t, -A clip_ratio_c) when ``clip_ratio_c`` is set.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: eps_low, eps_high.
        clip_ratio_c: dual-clip bound (> 1), or None.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(response_mask.bool(), advantages, 0.0)
    loss, metrics = clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, response_mask)}


@register_policy_loss("gspo")
def gspo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
):
    """Sequence-level importance ratio, token-level gradient (GSPO-token).

    s_i = exp(sequence_log_ratio_i); s_{i,t} = sg(s_i) pi_t / sg(pi_t) (value s_i, gradient
    sg(s_i) d log pi_t); l_t = max(-A s_{i,t}, -A clip(s_{i,t}, 1 - eps_low, 1 + eps_high)).

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: eps_low, eps_high (the paper: 3e-4, 4e-4).
        clip_ratio_c: dual-clip bound, or None (the paper).

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    mask = response_mask.bool()
    sequence = sequence_log_ratio(log_probs, old_log_probs, response_mask)
    valid_log_probs = torch.where(mask, log_probs, 0.0)
    ratio = torch.exp((sequence.detach()[:, None] + valid_log_probs - valid_log_probs.detach()).clamp(max=GSPO_LOG_RATIO_MAX))
    advantages = torch.where(mask, advantages, 0.0)
    loss, metrics = clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, response_mask)}


@register_policy_loss("cispo")
def cispo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
):
    """Clipped, stop-gradient importance weight times the REINFORCE term.

    l_t = -sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A log pi_t; the gradient is
    -w A d log pi_t on every valid token, clipped or not.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: bounds of the weight.
        clip_ratio_c: must be None (a dual clip does not apply to CISPO); taken so that one call
            site serves every loss and a configured dual clip is refused, not ignored.

    Returns:
        ``(per_token_loss [B, T], metrics)``; ``clip_fraction_low/high`` count truncated weights,
        ``dual_clip_fraction`` is 0.
    """
    if clip_ratio_c is not None:
        raise ValueError(f"cispo has no dual clip; set algorithm.clip_ratio_c (now {clip_ratio_c}) to null")
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    advantages = torch.where(mask, advantages, 0.0)
    loss = torch.where(mask, -weight * advantages * log_probs, 0.0)
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    metrics = {
        "clip_fraction_low": masked_mean((ratio < 1 - clip_ratio_low).to(ratio.dtype), response_mask),
        "clip_fraction_high": masked_mean((ratio > 1 + clip_ratio_high).to(ratio.dtype), response_mask),
        "dual_clip_fraction": zero,
    }
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, response_mask)}


@register_policy_loss("gpg")
def gpg(log_probs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor):
    """REINFORCE without ratio or clip: l_t = -A_t log pi_t.

    Args:
        log_probs: ``[B, T]``, differentiable.
        advantages, response_mask: ``[B, T]``.

    Returns:
        ``(per_token_loss [B, T], {})``.
    """
    mask = response_mask.bool()
    loss = -torch.where(mask, advantages, 0.0) * torch.where(mask, log_probs, 0.0)
    return torch.where(mask, loss, 0.0), {}


@register_policy_loss("sapo")
def sapo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tau_pos: float,
    tau_neg: float,
):
    """Soft gate of the token ratio: l_t = -A (4 / tau) sigmoid(tau (r - 1)).

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        tau_pos, tau_neg: the gate's temperature where A > 0 and where A <= 0.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, 0.0)
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1)) * (4 / tau)
    return torch.where(mask, -advantages * gate, 0.0), ratio_metrics(log_ratio, ratio, response_mask)


@register_policy_loss("gmpo")
def gmpo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
):
    """Geometric-mean ratio per response, clipped per token in log space (module docstring).

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``; the paper's advantages are per
            response (the same on every token), A_i is their mean over valid tokens.
        clip_ratio_low, clip_ratio_high: the log-ratio bounds -eps_low, eps_high.

    Returns:
        ``(per_token_loss [B, T], metrics)``: l_i on each valid token of response i.
    """
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    advantages = torch.where(mask, advantages, 0.0)
    sign = torch.sign(advantages)
    bounded = log_ratio.clamp(-clip_ratio_low, clip_ratio_high)
    clipped_log_ratio = sign * torch.minimum(sign * log_ratio, sign * bounded)
    lengths = mask.sum(-1).clamp(min=1).to(log_ratio.dtype)
    ratio = torch.exp(clipped_log_ratio.sum(-1) / lengths)
    sequence_loss = -(advantages.sum(-1) / lengths) * ratio
    loss = torch.where(mask, sequence_loss[:, None], 0.0)
    held = (sign * bounded < sign * log_ratio).to(log_ratio.dtype)
    metrics = {
        "clip_fraction_low": masked_mean(held * (advantages < 0), response_mask),
        "clip_fraction_high": masked_mean(held * (advantages > 0), response_mask),
    }
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio[:, None].expand_as(log_ratio), response_mask)}


def _total_variation_region(log_prob, old_log_prob, advantages, clip_ratio_low, clip_ratio_high):
    """DPPO-TV's trust region: p - q <= eps_high where A > 0, p - q >= -eps_low elsewhere."""
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    return torch.where(advantages > 0, prob - old_prob <= clip_ratio_high, prob - old_prob >= -clip_ratio_low)


def _binary_kl_region(log_prob, old_log_prob, advantages, clip_ratio_low, clip_ratio_high):
    """DPPO-KL's trust region: binary KL(q || p) <= eps, or p moved against the advantage's push."""
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    divergence = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log((1 - old_prob + 1e-8) / (1 - prob + 1e-8))
    return torch.where(
        advantages > 0, (divergence <= clip_ratio_high) | (prob <= old_prob), (divergence <= clip_ratio_low) | (prob >= old_prob)
    )


def _dppo(region, log_probs, old_log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """DPPO's per-token loss with the trust region ``region`` (module docstring) and its metrics."""
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    weight = (ratio if clip_ratio_c is None else ratio.clamp(max=clip_ratio_c)).detach()
    valid_log_probs = torch.where(mask, log_probs, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    valid_old_log_probs = torch.where(mask, old_log_probs, 0.0)
    inside = region(valid_log_probs.detach(), valid_old_log_probs, advantages, clip_ratio_low, clip_ratio_high) & mask
    loss = torch.where(inside, -advantages * weight * valid_log_probs, 0.0)
    truncated = torch.zeros_like(inside) if clip_ratio_c is None else inside & (ratio > clip_ratio_c)
    metrics = {
        "trust_region_masked_fraction": masked_mean((~inside).to(ratio.dtype), response_mask),
        "truncated_fraction": masked_mean(truncated.to(ratio.dtype), response_mask),
    }
    return loss, {**metrics, **ratio_metrics(log_ratio, weight, response_mask)}


@register_policy_loss("dppo_tv")
def dppo_tv(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
):
    """DPPO-Binary-TV: l_t = -A sg(min(r, c)) log pi_t inside |pi - pi_old| bounds, 0 outside.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: the probability-difference bounds eps_low, eps_high.
        clip_ratio_c: truncation c of the importance weight, or None.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    return _dppo(_total_variation_region, log_probs, old_log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)


@register_policy_loss("dppo_kl")
def dppo_kl(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None = None,
):
    """DPPO-Binary-KL: l_t = -A sg(min(r, c)) log pi_t inside a binary-KL bound, 0 outside.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: the binary-KL bounds eps_low (A <= 0), eps_high (A > 0).
        clip_ratio_c: truncation c of the importance weight, or None.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    return _dppo(_binary_kl_region, log_probs, old_log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)


def entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Per-token loss term -coefficient * H_t (minimising it raises the entropy); 0 where masked.

    Args:
        entropy: ``[B, T]``, the policy's entropy at each response position.
        response_mask: ``[B, T]``.
        coefficient: ``algorithm.entropy_coeff``.

    Returns:
        ``[B, T]``, to add to the policy loss before aggregation.
    """
    return torch.where(response_mask.bool(), -coefficient * entropy, 0.0)
