"""Advantage estimators: ``@register_advantage(name)`` pure functions over tensors and masks.

Shapes: ``scores: [B]`` (one scalar reward per response), ``token_rewards, values: [B, T]``,
``response_mask: [B, T]`` (1 on response tokens; responses are right-padded), ``group_ids: [B]``
(responses to the same prompt share an id; groups may have different sizes). Every estimator
returns ``(advantages, returns)``, both ``[B, T]`` and exactly 0 where ``response_mask`` is 0, and
never reads a masked position.

- ``grpo`` (Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps), the same for every token of
  response i; ``norm_by_std=False`` gives Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g.
  std is the unbiased group standard deviation (as verl).
- ``rloo`` (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g).
- ``reinforce_pp`` (REINFORCE++, Hu 2025): returns G_t = r_t + gamma G_{t+1} over the response's
  token rewards (the score on the last token plus any per-token KL penalty), then whitened over all
  valid tokens of the batch: A = (G - mean) / (std + eps).
- ``reinforce_pp_baseline``: A_i = r_i - mean_g, divided by the batch std of the valid tokens'
  advantages.
- ``gae`` (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token),
  A_t = delta_t + gamma lam A_{t+1}, returns = A + V; advantages whitened over valid tokens.

Departures, all deliberate: a group whose rewards are all equal (including a group of one) gets
advantage exactly 0 for grpo, rloo and reinforce_pp_baseline (verl gives a single-sample group
A = r); for that reason reinforce_pp_baseline only scales by the batch std and does not re-centre
(re-centring would move an all-equal group off 0).
"""

from __future__ import annotations

import torch

from megarl.algorithms.registry import Registry

EPS = 1e-6
"""Added to standard deviations, as verl and OpenRLHF do."""

ADVANTAGES: Registry = Registry("advantage estimator")
register_advantage = ADVANTAGES.register


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group mean, unbiased std, size, and whether the group's scores are all equal."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    groups = counts.numel()
    scores64 = scores.double()
    sums = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, scores64)
    means = sums / counts
    squares = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, (scores64 - means[inverse]) ** 2)
    stds = torch.sqrt(squares / (counts - 1).clamp(min=1))
    highs = torch.full((groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, scores64, "amax")
    lows = torch.full((groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, scores64, "amin")
    constant = (highs == lows)[inverse]
    return means[inverse], stds[inverse], counts[inverse], constant


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]`` on valid tokens, exactly 0 elsewhere."""
    mask = response_mask.bool()
    return torch.where(mask, per_sample.to(torch.float32)[:, None], torch.zeros((), dtype=torch.float32))


def _masked_mean_std(values: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = response_mask.bool()
    valid = values[mask].double()
    mean = valid.mean()
    std = valid.std() if valid.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return mean, std


@register_advantage("grpo")
def grpo(scores, response_mask, group_ids, *, norm_by_std: bool = True, **_):
    """Group-relative advantages (``norm_by_std=False``: Dr. GRPO). See the module docstring."""
    means, stds, _, constant = _group_stats(scores, group_ids)
    centred = scores.double() - means
    advantages = centred / (stds + EPS) if norm_by_std else centred
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    advantages = _broadcast(advantages, response_mask)
    return advantages, advantages.clone()


@register_advantage("rloo")
def rloo(scores, response_mask, group_ids, **_):
    """Leave-one-out baseline: A_i = r_i - mean of the other responses to the same prompt."""
    means, _, counts, constant = _group_stats(scores, group_ids)
    scale = counts.double() / (counts - 1).clamp(min=1)
    advantages = (scores.double() - means) * scale
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    advantages = _broadcast(advantages, response_mask)
    return advantages, advantages.clone()


def _discounted_returns(token_rewards, response_mask, gamma: float) -> torch.Tensor:
    mask = response_mask.bool()
    rewards = torch.where(mask, token_rewards.double(), torch.zeros((), dtype=torch.float64))
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float64)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, torch.zeros_like(running))
        returns[:, t] = running
    return returns


@register_advantage("reinforce_pp")
def reinforce_pp(token_rewards, response_mask, *, gamma: float = 1.0, **_):
    """REINFORCE++: discounted returns of the token rewards, whitened over the batch's tokens."""
    mask = response_mask.bool()
    returns = _discounted_returns(token_rewards, response_mask, gamma)
    mean, std = _masked_mean_std(returns, response_mask)
    advantages = torch.where(mask, (returns - mean) / (std + EPS), torch.zeros((), dtype=torch.float64))
    return advantages.float(), returns.float()


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(scores, response_mask, group_ids, **_):
    """REINFORCE++ with a group-mean baseline, scaled by the batch std of the advantages."""
    means, _, _, constant = _group_stats(scores, group_ids)
    centred = torch.where(constant, torch.zeros_like(means), scores.double() - means)
    tokens = _broadcast(centred, response_mask).double()
    _, std = _masked_mean_std(tokens, response_mask)
    advantages = (tokens / (std + EPS)).float()
    return advantages, _broadcast(centred, response_mask)


@register_advantage("gae")
def gae(token_rewards, values, response_mask, *, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True, **_):
    """Generalised advantage estimation with a critic's ``values: [B, T]``."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float64)
    rewards = torch.where(mask, token_rewards.double(), zero)
    values64 = torch.where(mask, values.double(), zero)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=torch.float64)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values64[:, t]
        running = torch.where(mask[:, t], delta + gamma * lam * running, zero)
        next_value = torch.where(mask[:, t], values64[:, t], zero)
        advantages[:, t] = running
    returns = torch.where(mask, advantages + values64, zero)
    if whiten:
        mean, std = _masked_mean_std(advantages, response_mask)
        advantages = torch.where(mask, (advantages - mean) / (std + EPS), zero)
    return advantages.float(), returns.float()


def sequence_log_ratio(log_probs, old_log_probs, response_mask) -> torch.Tensor:
    """GSPO's sequence-level log importance ratio: mean over response i's valid tokens of
    (log pi - log pi_old). ``[B, T]`` -> ``[B]``; 0 for a response without valid tokens."""
    mask = response_mask.bool()
    difference = torch.where(mask, log_probs - old_log_probs, torch.zeros((), dtype=log_probs.dtype))
    return difference.sum(-1) / mask.sum(-1).clamp(min=1)


def compute_advantages(name: str, **inputs):
    """Run the estimator registered as ``name`` (``algorithm.advantage_estimator``)."""
    return ADVANTAGES.get(name)(**inputs)
