"""Advantage estimators against naive per-sample loops, masking, and all-equal groups."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megarl.algorithms.advantages import ADVANTAGES, EPS, compute_advantages, sequence_log_ratio

pytestmark = pytest.mark.cpu


def batch(seed=0, lengths=(3, 5, 1, 4, 5, 2), groups=(0, 0, 0, 1, 1, 2), horizon=5):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), horizon)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return dict(
        scores=torch.randn(len(lengths), generator=generator),
        token_rewards=torch.randn(len(lengths), horizon, generator=generator),
        values=torch.randn(len(lengths), horizon, generator=generator),
        response_mask=mask,
        group_ids=torch.tensor(groups),
    )


def garbage(inputs, seed=1):
    """The same batch with large random values at every masked position."""
    generator = torch.Generator().manual_seed(seed)
    mask = inputs["response_mask"].bool()
    noisy = dict(inputs)
    for key in ("token_rewards", "values"):
        noisy[key] = torch.where(mask, inputs[key], 1e6 * torch.randn(inputs[key].shape, generator=generator))
    return noisy


def group_lists(inputs):
    groups = {}
    for i, g in enumerate(inputs["group_ids"].tolist()):
        groups.setdefault(g, []).append(i)
    return groups


def reference_grpo(inputs, norm_by_std):
    scores = inputs["scores"].tolist()
    out = [0.0] * len(scores)
    for members in group_lists(inputs).values():
        values = [scores[i] for i in members]
        mean = sum(values) / len(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        for i in members:
            if max(values) == min(values):
                out[i] = 0.0
            else:
                out[i] = (scores[i] - mean) / (std + EPS) if norm_by_std else scores[i] - mean
    return out


def reference_rloo(inputs):
    scores = inputs["scores"].tolist()
    out = [0.0] * len(scores)
    for members in group_lists(inputs).values():
        for i in members:
            others = [scores[j] for j in members if j != i]
            out[i] = scores[i] - sum(others) / len(others) if others else 0.0
    return out


def expand(per_sample, inputs):
    mask = inputs["response_mask"]
    return torch.tensor(per_sample)[:, None] * mask


def reference_returns(inputs, gamma):
    rewards, mask = inputs["token_rewards"].tolist(), inputs["response_mask"].tolist()
    out = []
    for row_rewards, row_mask in zip(rewards, mask):
        length, running, row = int(sum(row_mask)), 0.0, [0.0] * len(row_mask)
        for t in reversed(range(length)):
            running = row_rewards[t] + gamma * running
            row[t] = running
        out.append(row)
    return out


def whiten(rows, mask):
    valid = [v for row, m in zip(rows, mask) for v, keep in zip(row, m) if keep]
    mean, std = sum(valid) / len(valid), statistics.stdev(valid)
    return [[(v - mean) / (std + EPS) if keep else 0.0 for v, keep in zip(row, m)] for row, m in zip(rows, mask)]


def reference_gae(inputs, gamma, lam):
    rewards, values, mask = (inputs[k].tolist() for k in ("token_rewards", "values", "response_mask"))
    advantages = []
    for r, v, m in zip(rewards, values, mask):
        length, running, row = int(sum(m)), 0.0, [0.0] * len(m)
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            row[t] = running
        advantages.append(row)
    return advantages


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop(norm_by_std):
    inputs = batch()
    advantages, _ = compute_advantages("grpo", **inputs, norm_by_std=norm_by_std)
    expected = expand(reference_grpo(inputs, norm_by_std), inputs)
    assert (advantages - expected).abs().max() <= 1e-6


def test_rloo_matches_loop():
    inputs = batch()
    advantages, _ = compute_advantages("rloo", **inputs)
    assert (advantages - expand(reference_rloo(inputs), inputs)).abs().max() <= 1e-6


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_loop(gamma):
    inputs = batch()
    advantages, returns = compute_advantages("reinforce_pp", **inputs, gamma=gamma)
    expected_returns = reference_returns(inputs, gamma)
    assert (returns - torch.tensor(expected_returns)).abs().max() <= 1e-6
    expected = whiten(expected_returns, inputs["response_mask"].tolist())
    assert (advantages - torch.tensor(expected)).abs().max() <= 1e-6


def test_reinforce_pp_baseline_matches_loop():
    inputs = batch()
    advantages, _ = compute_advantages("reinforce_pp_baseline", **inputs)
    centred = reference_grpo(inputs, norm_by_std=False)
    mask = inputs["response_mask"].tolist()
    tokens = [c for c, m in zip(centred, mask) for keep in m if keep]
    std = statistics.stdev(tokens)
    expected = [[c / (std + EPS) if keep else 0.0 for keep in m] for c, m in zip(centred, mask)]
    assert (advantages - torch.tensor(expected)).abs().max() <= 1e-6


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_loop(gamma, lam):
    inputs = batch()
    advantages, returns = compute_advantages("gae", **inputs, gamma=gamma, lam=lam, whiten=False)
    expected = torch.tensor(reference_gae(inputs, gamma, lam))
    assert (advantages - expected).abs().max() <= 1e-6
    assert (returns - (expected + inputs["values"]) * inputs["response_mask"]).abs().max() <= 1e-6
    whitened, _ = compute_advantages("gae", **inputs, gamma=gamma, lam=lam)
    expected_whitened = torch.tensor(whiten(expected.tolist(), inputs["response_mask"].tolist()))
    assert (whitened - expected_whitened).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_masked_positions_change_nothing(name):
    inputs = batch()
    clean = compute_advantages(name, **inputs)
    noisy = compute_advantages(name, **garbage(inputs))
    for first, second in zip(clean, noisy):
        assert torch.equal(first, second)
        assert torch.equal(first * (1 - inputs["response_mask"]), torch.zeros_like(first))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_all_equal_group_gets_exactly_zero(name):
    inputs = batch()
    inputs["scores"] = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7])  # group 0 all equal, group 2 alone
    advantages, _ = compute_advantages(name, **inputs)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[[0, 1, 2, 5]], torch.zeros_like(advantages[[0, 1, 2, 5]]))
    assert advantages[3].abs().sum() > 0


def test_sequence_log_ratio():
    log_probs = torch.tensor([[0.5, 0.1, 9.0], [0.2, 0.0, 0.0]])
    old = torch.tensor([[0.1, 0.3, -9.0], [0.4, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ratio = sequence_log_ratio(log_probs, old, mask)
    assert torch.allclose(ratio, torch.tensor([(0.4 - 0.2) / 2, -0.2]))


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(KeyError, match="choose one of gae, grpo, reinforce_pp"):
        compute_advantages("ppo2", **batch())


def test_grpo_scale():
    # Two samples, rewards 0 and 1: std = 1/sqrt(2), advantages -+0.5 / std.
    inputs = batch(lengths=(2, 2), groups=(0, 0), horizon=2)
    inputs["scores"] = torch.tensor([0.0, 1.0])
    advantages, _ = compute_advantages("grpo", **inputs)
    assert advantages[1, 0].item() == pytest.approx(0.5 / (1 / math.sqrt(2) + EPS), abs=1e-6)
