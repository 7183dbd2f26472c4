"""Policy and value losses: ``@register_policy_loss(name)`` per-token losses to minimise.

Every policy loss takes ``log_probs, old_log_probs, advantages, response_mask: [B, T]`` and returns
``(per_token_loss [B, T], metrics)``; aggregation is separate (:mod:`megarl.algorithms.aggregation`).
Masked positions are never read and their loss is 0. With r_t = exp(log pi - log pi_old):

- ``ppo`` (Schulman et al. 2017) with clip-higher (DAPO, Yu et al. 2025) and dual clip (Ye et al.
  2020): l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); for A < 0 and a ``clip_ratio_c``
  bound c, l = min(l, -A c).
- ``gspo`` (Zheng et al. 2025): the sequence ratio s_i = exp(mean_t log r_t) replaces r_t, clipped
  the same way. Its gradient flows per token through s_{i,t} = sg(s_i) * pi_t / sg(pi_t), so
  d l / d log pi_t = -A sg(s_i) on unclipped tokens (the paper's token-level form, GSPO-token).
- ``cispo`` (MiniMax-M1, 2025): l = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi: the clipped
  importance weight scales the REINFORCE gradient and never stops it. (The paper clips only above;
  pass a large clip_ratio_low for that.)

Metrics are 0-d tensors over valid tokens: ``clip_fraction`` (the clipped branch is active),
``dual_clip_fraction``, ``approx_kl`` (k3 of pi_old against pi), ``ratio_mean``.
"""

from __future__ import annotations

import torch

from megarl.algorithms.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum() / mask.sum().clamp(min=1)


def _clipped_surrogate(ratio, advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    zero = torch.zeros((), dtype=ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_fraction": _masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()}
    if clip_ratio_c is not None:
        dual = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (dual < loss)
        loss = torch.where(dual_active, dual, loss)
        metrics["dual_clip_fraction"] = _masked_mean(dual_active.to(ratio.dtype), mask).detach()
    return torch.where(mask, loss, zero), metrics


def _common_metrics(log_ratio, mask) -> dict[str, torch.Tensor]:
    ratio = torch.exp(log_ratio)
    return {
        "approx_kl": _masked_mean(ratio - 1 - log_ratio, mask).detach(),
        "ratio_mean": _masked_mean(ratio, mask).detach(),
    }


@register_policy_loss("ppo")
def ppo(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None, **_):
    """Token-level clipped surrogate with clip-higher and optional dual clip."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=log_probs.dtype)
    log_ratio = torch.where(mask, log_probs - old_log_probs, zero)
    advantages = torch.where(mask, advantages, zero)
    loss, metrics = _clipped_surrogate(torch.exp(log_ratio), advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    return loss, {**metrics, **_common_metrics(log_ratio.detach(), mask)}


@register_policy_loss("gspo")
def gspo(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=3e-4, clip_ratio_high=4e-4, clip_ratio_c=None, **_):
    """Sequence-level importance ratio (GSPO-token); see the module docstring."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=log_probs.dtype)
    log_probs = torch.where(mask, log_probs, zero)
    log_ratio = torch.where(mask, log_probs - old_log_probs, zero)
    sequence_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    token_log_ratio = sequence_log_ratio.detach() + log_probs - log_probs.detach()
    advantages = torch.where(mask, advantages, zero)
    loss, metrics = _clipped_surrogate(torch.exp(token_log_ratio), advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    return loss, {**metrics, **_common_metrics(log_ratio.detach(), mask)}


@register_policy_loss("cispo")
def cispo(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=0.2, clip_ratio_high=0.2, **_):
    """Clipped, stop-gradient importance weight times the REINFORCE term."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=log_probs.dtype)
    log_ratio = torch.where(mask, log_probs - old_log_probs, zero)
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    loss = torch.where(mask, -weight * torch.where(mask, advantages, zero) * torch.where(mask, log_probs, zero), zero)
    metrics = {"clip_fraction": _masked_mean((weight != ratio).to(ratio.dtype), mask).detach()}
    return loss, {**metrics, **_common_metrics(log_ratio.detach(), mask)}


def value_loss(values, old_values, returns, response_mask, value_clip: float | None = None):
    """Critic loss per token: 0.5 (V - R)^2, or with clipping 0.5 max((V - R)^2, (V_clip - R)^2)
    where V_clip = old_V + clip(V - old_V, -value_clip, value_clip). Returns ``(loss [B, T],
    metrics)`` with ``value_clip_fraction``."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype)
    values, old_values, returns = (torch.where(mask, t, zero) for t in (values, old_values, returns))
    unclipped = (values - returns).square()
    if value_clip is None:
        return torch.where(mask, 0.5 * unclipped, zero), {}
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    clipped = (clipped_values - returns).square()
    loss = 0.5 * torch.maximum(unclipped, clipped)
    fraction = _masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    return torch.where(mask, loss, zero), {"value_clip_fraction": fraction}


def entropy_bonus(entropy, response_mask, coefficient: float) -> torch.Tensor:
    """Per-token loss term -coefficient * H (minimising it raises the entropy); 0 where masked."""
    mask = response_mask.bool()
    return torch.where(mask, -coefficient * entropy, torch.zeros((), dtype=entropy.dtype))


def policy_loss(name: str, **inputs):
    """Run the policy loss registered as ``name`` (``algorithm.policy_loss``)."""
    return POLICY_LOSSES.get(name)(**inputs)
