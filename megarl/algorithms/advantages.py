"""Advantage estimators: ``@register_advantage(name)`` pure functions over tensors and masks.

Shapes: ``scores: [B]`` (one scalar reward per response), ``token_rewards, values: [B, T]``,
``response_mask: [B, T]`` (1 on the response tokens that are trained on, float or bool),
``group_ids: [B]`` (responses to the same prompt share an id; groups may differ in size). Every
estimator returns ``(advantages, returns)``, both ``[B, T]``, exactly 0 where ``response_mask`` is 0,
and never reads a masked position. They compute in float64 and return the input's floating dtype
(at least float32).

With g the group of response i, n_g its size, mean_g and std_g (unbiased) its scores' statistics:

- ``grpo`` (Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps) on every token of response i;
  with ``norm_by_std=False`` it is Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g.
- ``rloo`` (Ahmadian et al. 2024): A_i = r_i - (sum_{j in g, j != i} r_j) / (n_g - 1)
  = n_g / (n_g - 1) * (r_i - mean_g).
- ``reinforce_pp`` (REINFORCE++, Hu 2025): G_t = r_t + gamma G_{t+1} over the token rewards (the
  score on the last token, see :func:`outcome_token_rewards`, plus the per-token KL penalty of
  :func:`megarl.algorithms.kl.apply_kl_penalty`), then whitened over all valid tokens of the batch:
  A = (G - mean) / (std + eps). ``returns`` are G.
- ``reinforce_pp_baseline`` (Hu 2025): A_i = (r_i - mean_g) / (std + eps), std over all valid
  tokens of the batch of the group-centred advantages.
- ``gae`` (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last
  token (the response ended), A_t = delta_t + gamma lam A_{t+1}; returns = A + V (before
  whitening); with ``whiten`` (verl's behaviour) A is whitened over the batch's valid tokens.

Batch statistics (whitening) use the unbiased std over valid tokens; eps = 1e-6 is added to every
std, as verl's GRPO does (verl's whitening divides by sqrt(var + 1e-8) instead; the two differ by
less than 1e-4 relative for any std above 0.01).

Departures, all deliberate:

- A group whose scores are all equal gets advantage exactly 0 (grpo, rloo, reinforce_pp_baseline),
  including a group of one (verl gives a single-sample GRPO group A = r; rloo has no baseline for
  it at all). These responses carry no learning signal relative to their siblings.
- reinforce_pp_baseline scales by the batch std but does not re-centre. The paper re-centres
  (A - mean) / std, which moves the all-equal groups off 0, and since the token-weighted mean of
  group-centred scores is not 0 (responses differ in length) it also biases every group.
- Positions masked inside a response (tool output in multi-turn rollouts) are skipped by the
  recursions of gae and reinforce_pp: the discount and the bootstrap value pass through them
  unchanged, as in verl's GAE. For right-padded responses this is the textbook recursion.
"""

from __future__ import annotations

import torch

from megarl.algorithms.groups import EPS, group_statistics
from megarl.algorithms.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")
register_advantage = ADVANTAGES.register


def compute_advantages(name: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator registered as ``name`` (``algorithm.advantage_estimator``).

    Pass every input you have (``scores``, ``token_rewards``, ``values``, ``response_mask``,
    ``group_ids``, ``gamma``, ``lam``, ``norm_by_std``, ``whiten``); each estimator receives the
    ones it declares (see :meth:`megarl.algorithms.registry.Registry.call`).
    """
    return ADVANTAGES.call(name, **inputs)


def outcome_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token rewards of an outcome reward: the score on each response's last valid token.

    Args:
        scores: ``[B]``.
        response_mask: ``[B, T]``.

    Returns:
        ``[B, T]`` with r_{i, last(i)} = scores_i and 0 elsewhere (a response without valid tokens
        gets no reward). Same dtype as :func:`compute_advantages` returns.
    """
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(-1, keepdim=True)
    is_last = (positions == last) & mask
    return torch.where(is_last, scores.to(_result_dtype(scores))[:, None], 0.0)


def _result_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]``: the sample's value on its valid tokens, exactly 0 elsewhere."""
    return torch.where(response_mask.bool(), per_sample[:, None], 0.0)


def _masked_mean_std(values: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of ``values: [B, T]`` over valid tokens (std 0 for fewer than two)."""
    mask = response_mask.bool()
    count = mask.sum()
    mean = torch.where(mask, values, 0.0).sum() / count.clamp(min=1)
    squares = torch.where(mask, (values - mean).square(), 0.0).sum()
    return mean, torch.sqrt(squares / (count - 1).clamp(min=1))


def _whiten(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(v - mean) / (std + eps) over the valid tokens of ``values: [B, T]``; 0 where masked."""
    mean, std = _masked_mean_std(values, response_mask)
    return torch.where(response_mask.bool(), (values - mean) / (std + EPS), 0.0)


def _per_sample_outputs(per_sample: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype):
    """An outcome estimator's ``(advantages, returns)``: critic-free, so returns = advantages."""
    advantages = _broadcast(per_sample, response_mask).to(dtype)
    return advantages, advantages.clone()


@register_advantage("grpo")
def grpo(scores: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool):
    """Group-relative advantages: A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g (Dr. GRPO).

    Args:
        scores: ``[B]``.
        response_mask: ``[B, T]``.
        group_ids: ``[B]``.
        norm_by_std: divide by the group's std (False: Dr. GRPO).

    Returns:
        ``(advantages, returns)``, ``[B, T]``; returns = advantages.
    """
    groups = group_statistics(scores, group_ids)
    centred = scores.double() - groups.mean
    advantages = centred / (groups.std + EPS) if norm_by_std else centred
    advantages = torch.where(groups.all_equal, 0.0, advantages)
    return _per_sample_outputs(advantages, response_mask, _result_dtype(scores))


@register_advantage("rloo")
def rloo(scores: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor):
    """Leave-one-out baseline: A_i = r_i - mean of the other responses of the group
    = n_g / (n_g - 1) * (r_i - mean_g); 0 for a group of one.

    Args:
        scores: ``[B]``.
        response_mask: ``[B, T]``.
        group_ids: ``[B]``.

    Returns:
        ``(advantages, returns)``, ``[B, T]``; returns = advantages.
    """
    groups = group_statistics(scores, group_ids)
    scale = groups.size.double() / (groups.size - 1).clamp(min=1)
    advantages = torch.where(groups.all_equal, 0.0, (scores.double() - groups.mean) * scale)
    return _per_sample_outputs(advantages, response_mask, _result_dtype(scores))


def _discounted_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over valid tokens (masked tokens skipped), float64 ``[B, T]``."""
    mask = response_mask.bool()
    rewards = torch.where(mask, token_rewards.double(), 0.0)
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


@register_advantage("reinforce_pp")
def reinforce_pp(token_rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float):
    """REINFORCE++: discounted returns of the token rewards, whitened over the batch's valid tokens.

    Args:
        token_rewards: ``[B, T]``, the outcome score on the last token plus per-token KL penalties.
        response_mask: ``[B, T]``.
        gamma: discount.

    Returns:
        ``(advantages, returns)``, ``[B, T]``: A = (G - mean) / (std + eps) and G.
    """
    returns = _discounted_returns(token_rewards, response_mask, gamma)
    dtype = _result_dtype(token_rewards)
    return _whiten(returns, response_mask).to(dtype), returns.to(dtype)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(scores: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor):
    """REINFORCE++-baseline: A_i = (r_i - mean_g) / (std + eps), std over the batch's valid tokens
    of r_i - mean_g (not re-centred; see the module docstring).

    Args:
        scores: ``[B]``.
        response_mask: ``[B, T]``.
        group_ids: ``[B]``.

    Returns:
        ``(advantages, returns)``, ``[B, T]``; returns = advantages.
    """
    groups = group_statistics(scores, group_ids)
    centred = torch.where(groups.all_equal, 0.0, scores.double() - groups.mean)
    _, std = _masked_mean_std(_broadcast(centred, response_mask), response_mask)
    return _per_sample_outputs(centred / (std + EPS), response_mask, _result_dtype(scores))


@register_advantage("gae")
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    whiten: bool = True,
):
    """Generalised advantage estimation with a critic.

    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last valid token),
    A_t = delta_t + gamma lam A_{t+1}, returns R_t = A_t + V_t.

    Args:
        token_rewards: ``[B, T]``.
        values: ``[B, T]``, the critic's V(s_t) before the update.
        response_mask: ``[B, T]``.
        gamma: discount.
        lam: GAE lambda.
        whiten: whiten A over the batch's valid tokens (returns are computed before).

    Returns:
        ``(advantages, returns)``, ``[B, T]``.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, token_rewards.double(), 0.0)
    values64 = torch.where(mask, values.double(), 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values64[:, t]
        running = torch.where(mask[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(mask[:, t], values64[:, t], next_value)
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values64, 0.0)
    if whiten:
        advantages = _whiten(advantages, response_mask)
    dtype = _result_dtype(token_rewards)
    return advantages.to(dtype), returns.to(dtype)
