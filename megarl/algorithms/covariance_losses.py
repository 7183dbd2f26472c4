"""Covariance-based policy losses: ``clip_cov`` and ``kl_cov``, in the registry of
:mod:`megarl.algorithms.policy_losses` (same inputs, per-token losses to MINIMISE, metrics).

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617; verl ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``): under a
policy-gradient step the policy's entropy falls with the covariance between a token's log-prob and
its advantage, and a small share of tokens with a large covariance drives the collapse. Both losses
restrain the update on a few of those tokens. With N the valid tokens of the micro-batch and the
means over them,

    C_t = (A_t - mean A) (log pi_t - mean log pi)        (no gradient through C)

and r_t = pi(a_t) / pi_old(a_t):

- ``clip_cov``: PPO's clipped surrogate l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),
  except on a set S of tokens whose loss (and gradient) is 0. The candidates are the valid tokens
  the PPO clip does not already hold (-A clip(r) <= -A r) with clip_cov_lb < C_t < clip_cov_ub;
  S is a uniformly random subset of min(k, #candidates) of them, k = max(1, floor(clip_cov_ratio
  N)). A token of S still counts in the aggregation's normaliser, as in verl.
- ``kl_cov``: no clip; l_t = -A r on every valid token, plus ppo_kl_coef |log pi_t - log pi_old_t|
  on the k = max(1, floor(kl_cov_ratio N)) valid tokens with the largest C_t (ties as
  ``torch.topk`` breaks them). The penalty reads the unclamped log-ratio, so its gradient pulls a
  token back however far it moved.

The draw of ``clip_cov`` is reproducible and ignores padding: the j-th valid token of the
micro-batch, counted row by row, gets the priority u_j, the j-th of N float64 uniforms from a CPU
generator seeded with ``seed`` (the trainer's seed per run, step, data-parallel rank and
micro-batch, :class:`megarl.trainer.policy.Policy`), and S is the k candidates of lowest priority.
Masked positions take no draw, so how many of them sit around a token never changes its priority;
a packed and a padded micro-batch list their valid tokens in the same order and draw the same S.
Reading N costs a device-to-host copy per micro-batch (verl reads it too).

The means, N and k are those of the micro-batch, as in verl: the loss depends on how a mini-batch
is cut into micro-batches and data-parallel ranks (``train.micro_batch_size``, the DP size, the
token budget), so, unlike the losses of :mod:`megarl.algorithms.policy_losses`, its gradient is
not the same for every split. It is exactly when S is the same whatever the split: no token is
selected (``clip_cov`` bounds that no covariance reaches), every token is (``kl_cov_ratio`` 1), or
the penalty is off (``ppo_kl_coef`` 0). Under context parallelism a rank holds a share of each
response: the means, N and k are that rank's.

Departures from verl, all deliberate: the token log-ratio is clamped to [-20, 20] before exp, as
for every loss here (verl's two leave it unclamped); S is drawn from the seeded priorities above
(verl: ``torch.randperm`` of the candidate list, from the global generator, the same distribution
of subsets); ``clip_ratio_c`` is refused by ``clip_cov`` (verl's ignores its actor's dual clip).
Metrics, means over the valid tokens: ``clip_cov`` reports ``clip_fraction_low`` /
``clip_fraction_high`` (the PPO clip holds, as for ``ppo``), ``kl_cov`` none; both report
``cov_selected_fraction`` (|S| / N; verl's ``pg_clipfrac`` of Clip-Cov), ``approx_kl`` (k3, as every
loss here; verl reports ``ppo_kl``: the mean of -log r for Clip-Cov, of |log r| for KL-Cov) and
``ratio_mean``.
"""

from __future__ import annotations

import math

import torch

from megarl.algorithms.aggregation import masked_mean
from megarl.algorithms.policy_losses import clipped_surrogate, ratio_metrics, register_policy_loss, token_log_ratio


def covariance(log_probs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """C_t = (A_t - mean A) (log pi_t - mean log pi), the means over the valid tokens; no gradient.

    Args:
        log_probs, advantages, response_mask: ``[B, T]``.

    Returns:
        ``[B, T]``, 0 where masked.
    """
    mask = response_mask.bool()
    log_probs = torch.where(mask, log_probs.detach(), 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    centred = (advantages - masked_mean(advantages, mask)) * (log_probs - masked_mean(log_probs, mask))
    return torch.where(mask, centred, 0.0)


def draw_priorities(response_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform priority in [0, 1) per valid token, the j-th valid token (row by row) taking the
    j-th draw of a CPU generator seeded with ``seed``; 2 where masked.

    Args:
        response_mask: ``[B, T]``.
        seed: the generator's seed.

    Returns:
        ``[B, T]`` float64 on ``response_mask``'s device.
    """
    mask = response_mask.bool()
    draws = torch.rand(int(mask.sum()), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    priorities = torch.full(mask.shape, 2.0, dtype=torch.float64, device=mask.device)
    priorities[mask] = draws.to(mask.device)
    return priorities


def _lowest(scores: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, T]`` bool: the ``count`` eligible positions of lowest score (every one when fewer)."""
    ranked = torch.where(eligible, scores, math.inf).flatten()
    chosen = torch.topk(ranked, min(count, ranked.numel()), largest=False).indices
    selected = torch.zeros_like(ranked, dtype=torch.bool).index_fill_(0, chosen, True)
    return selected.view_as(eligible) & eligible


@register_policy_loss("clip_cov")
def clip_cov(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_cov_ratio: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    seed: int,
    clip_ratio_c: float | None = None,
):
    """PPO's clipped surrogate with the loss of a random few high-covariance tokens set to 0.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        clip_ratio_low, clip_ratio_high: eps_low, eps_high of the PPO clip.
        clip_cov_ratio: k / N, the share of the valid tokens to select (at least one).
        clip_cov_lb, clip_cov_ub: the open interval of covariances that makes a candidate.
        seed: seeds the draw of the subset (module docstring).
        clip_ratio_c: must be None (Clip-Cov has no dual clip); taken so that a configured dual
            clip is refused, not ignored.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    if clip_ratio_c is not None:
        raise ValueError(f"clip_cov has no dual clip; set algorithm.clip_ratio_c (now {clip_ratio_c}) to null")
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, 0.0)
    loss, metrics = clipped_surrogate(ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, None)
    del metrics["dual_clip_fraction"]
    # The surrogate exceeds -A r exactly where the clip holds (no gradient there already).
    clip_holds = loss.detach() > -advantages * ratio.detach()
    cov = covariance(log_probs, advantages, response_mask)
    candidates = mask & ~clip_holds & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    valid_tokens = int(mask.sum())
    selected = _lowest(draw_priorities(response_mask, seed), candidates, max(int(clip_cov_ratio * valid_tokens), 1))
    loss = torch.where(selected, 0.0, loss)
    metrics["cov_selected_fraction"] = masked_mean(selected.to(ratio.dtype), response_mask)
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, response_mask)}


@register_policy_loss("kl_cov")
def kl_cov(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_cov_ratio: float,
    ppo_kl_coef: float,
):
    """-A r on every token, plus ppo_kl_coef |log r| on the top-k tokens by covariance.

    Args:
        log_probs: ``[B, T]``, differentiable.
        old_log_probs, advantages, response_mask: ``[B, T]``.
        kl_cov_ratio: k / N, the share of the valid tokens to penalise (at least one).
        ppo_kl_coef: the penalty's coefficient.

    Returns:
        ``(per_token_loss [B, T], metrics)``.
    """
    mask = response_mask.bool()
    log_ratio = token_log_ratio(log_probs, old_log_probs, response_mask)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, 0.0)
    valid_tokens = int(mask.sum())
    count = max(int(kl_cov_ratio * valid_tokens), 1) if valid_tokens else 0
    selected = _lowest(-covariance(log_probs, advantages, response_mask), mask, count)
    penalty = ppo_kl_coef * torch.where(mask, log_probs - old_log_probs, 0.0).abs()
    loss = torch.where(mask, -advantages * ratio + torch.where(selected, penalty, 0.0), 0.0)
    metrics = {"cov_selected_fraction": masked_mean(selected.to(ratio.dtype), response_mask)}
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, response_mask)}
