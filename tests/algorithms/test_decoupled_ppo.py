"""Decoupled PPO (the policy loss on pi_theta / pi_prox times the behaviour weight pi_prox / pi_behav)
against float64 per-token references written from its definition."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import response_mask, valid_cells, with_garbage

from megarl.algorithms.aggregation import aggregate_loss
from megarl.algorithms.mismatch import decoupled_weights
from megarl.algorithms.policy_losses import policy_loss

pytestmark = pytest.mark.cpu

LOW, HIGH, CAP = 0.2, 0.28, 1.5


def batch(behaviour_spread: float):
    """``(theta, prox, behav, advantages, mask)`` in float64; theta differentiable."""
    generator = torch.Generator().manual_seed(3)
    shape = (6, 5)
    prox = -3 * torch.rand(shape, generator=generator, dtype=torch.float64)
    theta = prox + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64)
    behav = prox + behaviour_spread * torch.randn(shape, generator=generator, dtype=torch.float64)
    advantages = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = response_mask((5, 1, 3, 5, 4, 2), 5, holes=[(0, 2)]).double()
    return theta.requires_grad_(), prox, behav, advantages, mask


def decoupled_loss(theta, prox, behav, advantages, mask, *, name="ppo", cap=CAP):
    """The token-mean loss as :class:`megarl.trainer.policy.Policy` forms it: per-token loss times
    the weights that :func:`megarl.trainer.experience.loss_weights` computes."""
    per_token, _ = policy_loss(
        name, log_probs=theta, old_log_probs=prox, advantages=advantages, response_mask=mask, clip_ratio_low=LOW, clip_ratio_high=HIGH
    )
    weights, metrics = decoupled_weights(prox, behav, mask, cap=cap)
    return aggregate_loss(per_token * weights, mask, "token-mean", mask.sum()), per_token, metrics


@pytest.mark.parametrize("name", ["ppo", "cispo"])
def test_on_policy_samples_give_the_plain_loss_exactly(name):
    theta, prox, _, advantages, mask = batch(0.0)
    loss, per_token, metrics = decoupled_loss(theta, prox, prox.clone(), advantages, mask, name=name)
    (gradient,) = torch.autograd.grad(loss, theta, retain_graph=True)
    plain = aggregate_loss(per_token, mask, "token-mean", mask.sum())
    (plain_gradient,) = torch.autograd.grad(plain, theta)
    assert torch.equal(loss, plain)
    assert torch.equal(gradient, plain_gradient)
    assert metrics["behav_imp_weight_mean"].item() == 1.0
    assert metrics["behav_imp_weight_capped_fraction"].item() == 0.0


def test_off_policy_loss_and_gradient_match_the_definition():
    theta, prox, behav, advantages, mask = batch(0.8)
    loss, _, metrics = decoupled_loss(theta, prox, behav, advantages, mask)
    (gradient,) = torch.autograd.grad(loss, theta)
    cells = list(valid_cells(mask))
    expected_loss, expected_gradient, weights, capped = 0.0, torch.zeros_like(gradient), [], 0
    for i, t in cells:
        u = math.exp(theta[i, t].item() - prox[i, t].item())
        w = math.exp(prox[i, t].item() - behav[i, t].item())
        a = advantages[i, t].item()
        if w > CAP:
            w, capped = 0.0, capped + 1
        weights.append(w)
        unclipped, clipped = -a * u, -a * min(max(u, 1 - LOW), 1 + HIGH)
        expected_loss += w * max(unclipped, clipped)
        # d/d log pi_theta of -A u is -A u; the clipped branch is constant where it is the max.
        expected_gradient[i, t] = w * -a * u if unclipped >= clipped else 0.0
    assert 0 < capped < len(cells)
    assert any(w != 0 and abs(w - 1) > 0.3 for w in weights)
    assert loss.item() == pytest.approx(expected_loss / len(cells), rel=1e-12)
    torch.testing.assert_close(gradient, expected_gradient / len(cells), rtol=1e-12, atol=1e-15)
    assert metrics["behav_imp_weight_mean"].item() == pytest.approx(sum(weights) / len(cells), rel=1e-12)
    assert metrics["behav_imp_weight_capped_fraction"].item() == pytest.approx(capped / len(cells), rel=1e-12)


def test_the_cap_zeroes_only_weights_above_it_and_none_keeps_all():
    prox = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))
    behav = torch.log(torch.tensor([[0.5, 0.25, 0.2, 0.05]], dtype=torch.float64))  # w = 1, 2, 2.5, 10
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    weights, metrics = decoupled_weights(prox.requires_grad_(), behav, mask, cap=2.5)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 2.5, 0.0]], dtype=torch.float64))
    assert not weights.requires_grad
    assert metrics["behav_imp_weight_capped_fraction"].item() == 0.25
    assert metrics["behav_imp_weight_mean"].item() == pytest.approx(5.5 / 4)
    uncapped, metrics = decoupled_weights(prox, behav, mask, cap=None)
    torch.testing.assert_close(uncapped, torch.tensor([[1.0, 2.0, 2.5, 10.0]], dtype=torch.float64))
    assert metrics["behav_imp_weight_capped_fraction"].item() == 0.0


def test_masked_positions_change_nothing():
    _, prox, behav, _, mask = batch(0.8)
    clean = decoupled_weights(prox, behav, mask, cap=CAP)
    dirty = decoupled_weights(with_garbage(prox, mask, 1), with_garbage(behav, mask, 2), mask, cap=CAP)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[0][mask == 0], torch.zeros_like(clean[0][mask == 0]))
    assert all(torch.equal(clean[1][key], dirty[1][key]) for key in clean[1])
