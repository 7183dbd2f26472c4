"""KL estimators against their formulas, the penalty, the loss term and the controllers."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import response_mask, valid_cells, with_garbage

from megarl.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    estimate_kl,
    kl_controller,
    kl_loss,
)

pytestmark = pytest.mark.cpu


def k3_verl(d):
    x = min(max(-d, -20.0), 20.0)
    return min(math.exp(x) - 1 - x, 10.0)


FORMULAS = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d * d,
    "mse": lambda d: 0.5 * d * d,
    "k3": k3_verl,
    "low_var_kl": k3_verl,
    "abs": abs,
}


def batch():
    generator = torch.Generator().manual_seed(0)
    log_probs = -3 * torch.rand(4, 5, generator=generator, dtype=torch.float64)
    ref_log_probs = log_probs + 2 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    ref_log_probs[0, 0] = log_probs[0, 0] + 30.0  # past both of k3's clamps
    ref_log_probs[0, 1] = log_probs[0, 1] - 30.0
    return log_probs, ref_log_probs, response_mask((5, 2, 4, 3), 5)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_estimators_match_formulas(name):
    log_probs, ref_log_probs, mask = batch()
    estimate = estimate_kl(name, log_probs, ref_log_probs, mask)
    for i, t in valid_cells(mask):
        d = log_probs[i, t].item() - ref_log_probs[i, t].item()
        assert estimate[i, t].item() == pytest.approx(FORMULAS[name](d), abs=1e-6)
    dirty = estimate_kl(name, with_garbage(log_probs, mask, 1), with_garbage(ref_log_probs, mask, 2), mask)
    assert torch.equal(estimate, dirty)
    assert torch.equal(estimate[mask == 0], torch.zeros_like(estimate[mask == 0]))


@pytest.mark.parametrize("name", ["k1", "k3", "low_var_kl", "abs", "k2"])
def test_straight_through_has_the_value_of_its_estimator_and_the_gradient_of_k2(name):
    log_probs, ref_log_probs, mask = batch()
    log_probs.requires_grad_()
    estimate = estimate_kl(name + "+", log_probs, ref_log_probs, mask)
    estimate.sum().backward()
    for i, t in valid_cells(mask):
        d = log_probs[i, t].item() - ref_log_probs[i, t].item()
        assert estimate[i, t].item() == pytest.approx(FORMULAS[name](d), abs=1e-6)
        assert log_probs.grad[i, t].item() == pytest.approx(d, abs=1e-6)  # d (d^2 / 2) / d log pi
    assert torch.equal(log_probs.grad[mask == 0], torch.zeros_like(log_probs.grad[mask == 0]))
    dirty_log_probs = with_garbage(log_probs.detach(), mask, 1).requires_grad_()
    dirty = estimate_kl(name + "+", dirty_log_probs, with_garbage(ref_log_probs, mask, 2), mask)
    dirty.sum().backward()
    assert torch.equal(estimate, dirty) and torch.equal(log_probs.grad, dirty_log_probs.grad)


def test_straight_through_kl_loss_and_unknown_base():
    log_probs, ref_log_probs, mask = batch()
    loss = kl_loss(log_probs, ref_log_probs, mask, estimator="k3+", coefficient=0.5)
    assert torch.equal(loss, 0.5 * estimate_kl("k3", log_probs, ref_log_probs, mask))
    with pytest.raises(KeyError, match="unknown KL estimator 'k4'"):
        estimate_kl("k4+", log_probs, ref_log_probs, mask)


def test_config_names_every_straight_through_variant():
    from typing import get_args

    from megarl.algorithms.kl import KL_ESTIMATORS, STRAIGHT_THROUGH_SUFFIX
    from megarl.config.algorithm import KLEstimator

    for name in get_args(KLEstimator):
        KL_ESTIMATORS.get(name.removesuffix(STRAIGHT_THROUGH_SUFFIX))
    assert {"k1+", "k3+"} <= set(get_args(KLEstimator))


def test_kl_loss_is_the_scaled_masked_estimate():
    log_probs, ref_log_probs, mask = batch()
    loss = kl_loss(log_probs, ref_log_probs, mask, estimator="low_var_kl", coefficient=0.5)
    assert torch.equal(loss, 0.5 * estimate_kl("k3", log_probs, ref_log_probs, mask))


def test_kl_penalty_in_the_reward():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    kl = torch.tensor([[0.5, -0.5, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(apply_kl_penalty(rewards, kl, mask, 0.1), torch.tensor([[-0.05, 1.05, 0.0]]))


def test_unknown_estimator_lists_the_valid_ones():
    log_probs, ref_log_probs, mask = batch()
    with pytest.raises(KeyError, match="choose one of abs, k1, k2, k3, low_var_kl, mse"):
        estimate_kl("k4", log_probs, ref_log_probs, mask)


def test_fixed_controller_keeps_its_coefficient():
    controller = kl_controller("fixed", init_coef=0.1, target=0.05, horizon=100)
    assert isinstance(controller, FixedKLController)
    controller.update(5.0, 64)
    assert controller.value == 0.1


def test_adaptive_controller_follows_ziegler():
    controller = kl_controller("adaptive", init_coef=0.1, target=0.05, horizon=1000)
    assert isinstance(controller, AdaptiveKLController)
    beta = 0.1
    for observed_kl in (1.0, 0.05, 0.06, 0.0, 0.04):
        controller.update(observed_kl, 100)
        error = min(max(observed_kl / 0.05 - 1, -0.2), 0.2)
        beta *= 1 + error * 100 / 1000
        assert controller.value == pytest.approx(beta, rel=1e-12)
    assert controller.value != 0.1


def test_controller_errors():
    with pytest.raises(ValueError, match="choose one of adaptive, fixed"):
        kl_controller("linear", init_coef=0.1, target=0.1, horizon=10)
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
