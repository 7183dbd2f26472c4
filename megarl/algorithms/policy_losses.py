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

Before exp, as verl 0.9 does: the token log-ratio (ppo, cispo) is clamped to [-20, 20]; GSPO's
log-ratio sg(log s_i) + log pi_t - sg(log pi_t) is clamped above at 10 only (no gradient past
it), so one response cannot overflow the loss.

Metrics are detached 0-d tensors, means over valid tokens: ``clip_fraction_low`` (A < 0 and the
ratio is clipped at 1 - eps_low: no gradient), ``clip_fraction_high`` (A > 0, clipped at
1 + eps_high), ``dual_clip_fraction``, ``approx_kl`` (k3 estimate of KL(pi_old || pi):
r - 1 - log r with the token ratio r), ``ratio_mean`` (the ratio the loss uses).
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


def _clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c):
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


def _token_log_ratio(log_probs, old_log_probs, response_mask):
    """log r_t = log pi - log pi_old, 0 where masked, clamped to +-LOG_RATIO_LIMIT: ``[B, T]``."""
    log_ratio = torch.where(response_mask.bool(), log_probs - old_log_probs, 0.0)
    return log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _ratio_metrics(token_log_ratio, ratio, response_mask) -> dict[str, torch.Tensor]:
    token_log_ratio, ratio = token_log_ratio.detach(), ratio.detach()
    return {
        "approx_kl": masked_mean(torch.exp(token_log_ratio) - 1 - token_log_ratio, response_mask),
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
    log_ratio = _token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(response_mask.bool(), advantages, 0.0)
    loss, metrics = _clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    return loss, {**metrics, **_ratio_metrics(log_ratio, ratio, response_mask)}


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
    loss, metrics = _clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    token_log_ratio = _token_log_ratio(log_probs, old_log_probs, response_mask)
    return loss, {**metrics, **_ratio_metrics(token_log_ratio, ratio, response_mask)}


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
    log_ratio = _token_log_ratio(log_probs, old_log_probs, response_mask)
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
    return loss, {**metrics, **_ratio_metrics(log_ratio, ratio, response_mask)}


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
