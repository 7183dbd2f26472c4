"""Policy/value losses and KL estimators against naive per-token loops; masking never matters."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    kl_loss,
    kl_penalty,
)
from megarl.algorithms.policy_losses import POLICY_LOSSES, entropy_bonus, policy_loss, value_loss

pytestmark = pytest.mark.cpu

LENGTHS = (4, 1, 3, 4)


def batch(seed=0, spread=0.5):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(LENGTHS), 4)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    old = -torch.rand(len(LENGTHS), 4, generator=generator) * 3
    new = old + spread * torch.randn(len(LENGTHS), 4, generator=generator)
    advantages = torch.randn(len(LENGTHS), 1, generator=generator).expand(-1, 4).clone()
    return dict(log_probs=new, old_log_probs=old, advantages=advantages, response_mask=mask)


def noisy(inputs, seed=3):
    generator = torch.Generator().manual_seed(seed)
    mask = inputs["response_mask"].bool()
    out = dict(inputs)
    for key in ("log_probs", "old_log_probs", "advantages"):
        out[key] = torch.where(mask, inputs[key], 50 * torch.randn(inputs[key].shape, generator=generator))
    return out


def cells(inputs):
    mask = inputs["response_mask"].tolist()
    for i, row in enumerate(mask):
        for t, keep in enumerate(row):
            if keep:
                yield i, t


def ppo_reference(inputs, low, high, c):
    out = torch.zeros_like(inputs["log_probs"])
    for i, t in cells(inputs):
        ratio = math.exp(inputs["log_probs"][i, t].item() - inputs["old_log_probs"][i, t].item())
        a = inputs["advantages"][i, t].item()
        loss = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
        if c is not None and a < 0:
            loss = min(loss, -a * c)
        out[i, t] = loss
    return out


@pytest.mark.parametrize("low,high,c", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.28, 3.0)])
def test_ppo_matches_loop(low, high, c):
    inputs = batch(spread=1.0)
    loss, metrics = policy_loss("ppo", **inputs, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c)
    assert (loss - ppo_reference(inputs, low, high, c)).abs().max() <= 1e-6
    assert 0 < metrics["clip_fraction"] < 1
    if c is not None:
        assert "dual_clip_fraction" in metrics


def test_gspo_matches_loop_and_gradient():
    inputs = batch(spread=0.01)
    inputs["log_probs"].requires_grad_(True)
    low, high = 3e-4, 4e-4
    loss, _ = policy_loss("gspo", **inputs, clip_ratio_low=low, clip_ratio_high=high)
    expected = torch.zeros_like(loss)
    gradients = torch.zeros_like(loss)
    for i, length in enumerate(LENGTHS):
        diffs = [inputs["log_probs"][i, t].item() - inputs["old_log_probs"][i, t].item() for t in range(length)]
        s = math.exp(sum(diffs) / length)
        a = inputs["advantages"][i, 0].item()
        clipped = min(max(s, 1 - low), 1 + high)
        for t in range(length):
            expected[i, t] = max(-a * s, -a * clipped)
            gradients[i, t] = -a * s if -a * s >= -a * clipped else 0.0
    assert (loss.detach() - expected).abs().max() <= 1e-6
    loss.sum().backward()
    assert (inputs["log_probs"].grad - gradients).abs().max() <= 1e-6


def test_cispo_matches_loop_and_keeps_gradient_when_clipped():
    inputs = batch(spread=1.0)
    inputs["log_probs"].requires_grad_(True)
    loss, _ = policy_loss("cispo", **inputs, clip_ratio_low=0.2, clip_ratio_high=0.2)
    for i, t in cells(inputs):
        ratio = math.exp(inputs["log_probs"][i, t].item() - inputs["old_log_probs"][i, t].item())
        weight = min(max(ratio, 0.8), 1.2)
        a = inputs["advantages"][i, t].item()
        assert loss[i, t].item() == pytest.approx(-weight * a * inputs["log_probs"][i, t].item(), abs=1e-6)
    loss.sum().backward()
    # Every valid token keeps a gradient -weight * A, clipped or not.
    valid = inputs["response_mask"].bool()
    assert (inputs["log_probs"].grad[valid] != 0).all()


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_masked_positions_change_nothing(name):
    inputs = batch(spread=1.0)
    clean, clean_metrics = policy_loss(name, **inputs)
    dirty, dirty_metrics = policy_loss(name, **noisy(inputs))
    assert torch.equal(clean, dirty)
    assert all(torch.equal(clean_metrics[k], dirty_metrics[k]) for k in clean_metrics)


def test_value_loss_clipping_matches_loop():
    generator = torch.Generator().manual_seed(1)
    values, old, returns = (torch.randn(4, 4, generator=generator) for _ in range(3))
    mask = batch()["response_mask"]
    loss, metrics = value_loss(values, old, returns, mask, value_clip=0.2)
    for i in range(4):
        for t in range(4):
            if not mask[i, t]:
                assert loss[i, t] == 0
                continue
            v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            clipped = o + min(max(v - o, -0.2), 0.2)
            assert loss[i, t].item() == pytest.approx(0.5 * max((v - r) ** 2, (clipped - r) ** 2), abs=1e-6)
    assert 0 <= metrics["value_clip_fraction"] <= 1
    garbage = torch.where(mask.bool(), values, torch.full_like(values, 1e6))
    assert torch.equal(value_loss(garbage, old, returns, mask, value_clip=0.2)[0], loss)


def test_entropy_bonus_sign():
    entropy = torch.tensor([[1.0, 2.0]])
    assert torch.equal(entropy_bonus(entropy, torch.tensor([[1.0, 0.0]]), 0.1), torch.tensor([[-0.1, 0.0]]))


@pytest.mark.parametrize(
    "name,formula",
    [
        ("k1", lambda d: d),
        ("k2", lambda d: 0.5 * d * d),
        ("mse", lambda d: 0.5 * d * d),
        ("k3", lambda d: min(max(math.exp(-d) - 1 + d, -10), 10)),
        ("low_var_kl", lambda d: min(max(math.exp(-d) - 1 + d, -10), 10)),
        ("abs", abs),
    ],
)
def test_kl_estimators_match_formulas(name, formula):
    inputs = batch(spread=2.0)
    estimate = kl_penalty(name, inputs["log_probs"], inputs["old_log_probs"])
    for i, t in cells(inputs):
        d = inputs["log_probs"][i, t].item() - inputs["old_log_probs"][i, t].item()
        assert estimate[i, t].item() == pytest.approx(formula(d), abs=1e-5)
    assert set(KL_ESTIMATORS.names()) == {"k1", "k2", "mse", "k3", "low_var_kl", "abs"}


def test_kl_penalty_in_reward_and_controllers():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    kl = torch.tensor([[0.5, 0.5, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.equal(apply_kl_penalty(rewards, kl, mask, 0.1), torch.tensor([[-0.05, 0.95, 0.0]]))
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=0.05, horizon=1000)
    adaptive.update(1.0, 100)  # far above target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(0.05, 100)  # on target: unchanged
    assert adaptive.value == pytest.approx(0.1 * 1.02)


def test_kl_loss_term_is_masked_and_scaled():
    inputs = batch(spread=1.0)
    loss = kl_loss(inputs["log_probs"], inputs["old_log_probs"], inputs["response_mask"], "k3", 0.5)
    expected = 0.5 * kl_penalty("k3", inputs["log_probs"], inputs["old_log_probs"]) * inputs["response_mask"]
    assert torch.allclose(loss, expected)
    dirty = noisy(inputs)
    assert torch.equal(kl_loss(dirty["log_probs"], dirty["old_log_probs"], inputs["response_mask"], "k3", 0.5), loss)
