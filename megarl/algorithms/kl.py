"""KL estimators between the policy and the reference policy, and the KL-in-reward controllers.

Per token, with d = log pi(a) - log pi_ref(a) for the sampled token a ~ pi (Schulman's estimators):

- ``k1``:              d                         (unbiased, high variance, can be negative)
- ``k2`` / ``mse``:    d^2 / 2
- ``k3`` / ``low_var_kl``: exp(-d) - 1 + d       (unbiased, non-negative, low variance); clamped to
  [-10, 10] as verl does, so one token with a huge ratio cannot dominate the batch.
- ``abs``:             |d|

KL in the reward: r_t <- r_t - beta * kl_t. ``FixedKLController`` keeps beta; the
``AdaptiveKLController`` of Ziegler et al. (2019) updates it after each step with the observed KL:
error = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + error * n_steps / horizon).
"""

from __future__ import annotations

import dataclasses

import torch

from megarl.algorithms.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")
register_kl = KL_ESTIMATORS.register

K3_CLAMP = 10.0
"""verl's bound on the k3 estimate per token."""


@register_kl("k1")
def k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T]``: log pi - log pi_ref."""
    return log_probs - ref_log_probs


@register_kl("k2", "mse")
def k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T]``: (log pi - log pi_ref)^2 / 2."""
    return 0.5 * (log_probs - ref_log_probs).square()


@register_kl("k3", "low_var_kl")
def k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T]``: exp(ref - logp) - 1 - (ref - logp), clamped to [-10, 10]."""
    log_ratio = ref_log_probs - log_probs
    return torch.clamp(torch.exp(log_ratio) - 1 - log_ratio, min=-K3_CLAMP, max=K3_CLAMP)


@register_kl("abs")
def absolute(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T]``: |log pi - log pi_ref|."""
    return (log_probs - ref_log_probs).abs()


def kl_penalty(name: str, log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate registered as ``name``."""
    return KL_ESTIMATORS.get(name)(log_probs, ref_log_probs)


def kl_loss(log_probs, ref_log_probs, response_mask, estimator: str, coefficient: float) -> torch.Tensor:
    """KL to the reference as a loss term: per-token coefficient * kl (0 where masked), to add to
    the policy loss before aggregation (verl: actor.use_kl_loss, kl_loss_type)."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=log_probs.dtype)
    estimate = kl_penalty(estimator, torch.where(mask, log_probs, zero), torch.where(mask, ref_log_probs, zero))
    return torch.where(mask, coefficient * estimate, zero)


def apply_kl_penalty(token_rewards, kl, response_mask, coefficient: float) -> torch.Tensor:
    """r_t - beta * kl_t on valid tokens; masked positions are 0 and never read."""
    mask = response_mask.bool()
    return torch.where(mask, token_rewards - coefficient * kl, torch.zeros((), dtype=token_rewards.dtype))


@dataclasses.dataclass(slots=True)
class FixedKLController:
    """beta stays at its initial value."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


@dataclasses.dataclass(slots=True)
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller towards ``target`` KL over ``horizon`` samples."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a step that saw ``current_kl`` over ``n_steps`` samples."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
