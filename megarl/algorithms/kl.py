"""KL between the policy and the reference policy: per-token estimators, the KL penalty in the
reward, the KL loss term, and the controllers of the penalty's coefficient.

Per token, with d = log pi(a) - log pi_ref(a) for the sampled token a ~ pi (Schulman, "Approximating
KL divergence", 2020), each an estimate of KL(pi || pi_ref):

- ``k1``:                   d                  unbiased, high variance, can be negative
- ``k2`` (alias ``mse``):   d^2 / 2            biased, low variance, >= 0
- ``k3`` (alias ``low_var_kl``): exp(-d) - 1 + d   unbiased, low variance, >= 0. As verl does, -d is
  clamped to [-20, 20] before exp and the estimate to at most 10 (verl clamps to [-10, 10]; k3 is
  never negative), so one token with an extreme ratio cannot dominate the batch.
- ``abs``:                  |d|

Straight-through variants: a registered name followed by ``+`` (``k1+``, ``k3+``,
``low_var_kl+``, ``abs+``; verl's ``kl_penalty`` names ending in ``+``) has the value of that
estimator and the gradient of k2,

    k+_t = k2_t - sg(k2_t) + sg(k_t),   so   d k+_t / d log pi = d,

because k1 and k3 are unbiased estimates of KL's value but their gradients are not unbiased
estimates of KL's gradient, and k2's is (Schulman 2020; verl ``kl_penalty``). The value, and so
the reward penalty, equals the base estimator's: only the KL loss term
(``algorithm.kl_loss_estimator``) sees the difference. ``k2+`` is k2.

KL in the reward (verl ``use_kl_in_reward``): r_t <- r_t - beta kl_t, then token rewards go to a
token-level estimator (gae, reinforce_pp). KL as a loss (verl ``use_kl_loss``): beta kl_t is added
to the per-token policy loss before aggregation.

Controllers of beta. ``FixedKLController`` keeps it. ``AdaptiveKLController`` (Ziegler et al. 2019)
is a proportional controller towards a target KL: after a step that saw mean KL ``kl`` over
``n_steps`` samples,

    error = clip(kl / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)
"""

from __future__ import annotations

import torch

from megarl.algorithms.registry import Registry

LOG_RATIO_LIMIT = 20.0
"""verl's bound on log pi_ref - log pi inside k3."""
K3_LIMIT = 10.0
"""verl's bound on the k3 estimate per token."""
ADAPTIVE_ERROR_LIMIT = 0.2
"""Ziegler et al.'s bound on the controller's proportional error."""

KL_ESTIMATORS: Registry = Registry("KL estimator")
register_kl = KL_ESTIMATORS.register

STRAIGHT_THROUGH_SUFFIX = "+"
"""Appended to an estimator's name: its value with k2's gradient (module docstring)."""


@register_kl("k1")
def k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """d = log pi - log pi_ref; ``[B, T]`` -> ``[B, T]``."""
    return log_probs - ref_log_probs


@register_kl("k2", "mse")
def k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """d^2 / 2; ``[B, T]`` -> ``[B, T]``."""
    return 0.5 * (log_probs - ref_log_probs).square()


@register_kl("k3", "low_var_kl")
def k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """min(exp(x) - 1 - x, 10) with x = clamp(log pi_ref - log pi, -20, 20); ``[B, T]`` -> ``[B, T]``."""
    log_ratio = torch.clamp(ref_log_probs - log_probs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.clamp(torch.exp(log_ratio) - 1 - log_ratio, max=K3_LIMIT)


@register_kl("abs")
def absolute(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """|d|; ``[B, T]`` -> ``[B, T]``."""
    return (log_probs - ref_log_probs).abs()


def estimate_kl(
    estimator: str, log_probs: torch.Tensor, ref_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """The per-token KL estimate registered as ``estimator``, 0 where masked (never read there).

    Args:
        estimator: a name of :data:`KL_ESTIMATORS` (``algorithm.kl_estimator``), or one followed
            by ``+`` for its straight-through variant (value of the estimator, gradient of k2).
        log_probs, ref_log_probs, response_mask: ``[B, T]``.

    Returns:
        ``[B, T]``, differentiable in ``log_probs``.
    """
    straight_through = estimator.endswith(STRAIGHT_THROUGH_SUFFIX)
    function = KL_ESTIMATORS.get(estimator.removesuffix(STRAIGHT_THROUGH_SUFFIX))
    mask = response_mask.bool()
    log_probs, ref_log_probs = torch.where(mask, log_probs, 0.0), torch.where(mask, ref_log_probs, 0.0)
    estimate = function(log_probs, ref_log_probs)
    if straight_through:
        surrogate = k2(log_probs, ref_log_probs)
        estimate = surrogate - surrogate.detach() + estimate.detach()
    return torch.where(mask, estimate, 0.0)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    estimator: str,
    coefficient: float,
) -> torch.Tensor:
    """KL to the reference as a per-token loss term: beta * kl_t, 0 where masked.

    Args:
        log_probs: ``[B, T]``, differentiable.
        ref_log_probs, response_mask: ``[B, T]``.
        estimator: ``algorithm.kl_loss_estimator``.
        coefficient: beta, ``algorithm.kl_loss_coef``.

    Returns:
        ``[B, T]``, to add to the per-token policy loss before aggregation.
    """
    return coefficient * estimate_kl(estimator, log_probs, ref_log_probs, response_mask)


def apply_kl_penalty(
    token_rewards: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, coefficient: float
) -> torch.Tensor:
    """Token rewards with the KL penalty: r_t - beta kl_t on valid tokens, 0 where masked.

    Args:
        token_rewards: ``[B, T]`` (e.g. :func:`megarl.algorithms.advantages.outcome_token_rewards`).
        kl: ``[B, T]``, from :func:`estimate_kl` with detached log-probs.
        response_mask: ``[B, T]``.
        coefficient: beta, the controller's current ``value``.

    Returns:
        ``[B, T]``.
    """
    mask = response_mask.bool()
    return torch.where(mask, token_rewards - coefficient * torch.where(mask, kl, 0.0), 0.0)


class FixedKLController:
    """beta stays at its initial value.

    Args:
        init_coef: beta (``algorithm.kl_coef``), read as ``value``.
    """

    def __init__(self, init_coef: float):
        self.value = init_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing moves; the same interface as :class:`AdaptiveKLController`."""


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller of beta towards ``target`` (module docstring).

    Args:
        init_coef: initial beta (``algorithm.kl_coef``), read as ``value``.
        target: the KL to hold (``algorithm.kl_target``).
        horizon: samples over which a full error moves beta by the error (``algorithm.kl_horizon``).
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta <- beta (1 + clip(current_kl / target - 1, -0.2, 0.2) n_steps / horizon).

        Args:
            current_kl: the KL observed in the step: the mean over responses of each response's
                mean KL, as verl feeds its controller.
            n_steps: the number of samples in the step.
        """
        error = min(max(current_kl / self.target - 1.0, -ADAPTIVE_ERROR_LIMIT), ADAPTIVE_ERROR_LIMIT)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(kind: str, *, init_coef: float, target: float, horizon: int) -> FixedKLController | AdaptiveKLController:
    """The controller named by ``algorithm.kl_ctrl``: ``fixed`` or ``adaptive``."""
    if kind == "fixed":
        return FixedKLController(init_coef)
    if kind == "adaptive":
        return AdaptiveKLController(init_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; choose one of adaptive, fixed")
