"""Train/rollout corrections (TIS, ICEPOP) and mismatch metrics against per-token loops."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import response_mask, valid_cells, with_garbage

from megarl.algorithms.mismatch import icepop_weights, mismatch_metrics, tis_weights

pytestmark = pytest.mark.cpu


def batch():
    generator = torch.Generator().manual_seed(0)
    train = -3 * torch.rand(5, 6, generator=generator)
    rollout = train + 0.8 * torch.randn(5, 6, generator=generator)
    return train.requires_grad_(), rollout, response_mask((6, 2, 5, 1, 4), 6)


def ratios(train, rollout, mask):
    return {(i, t): math.exp(train[i, t].item() - rollout[i, t].item()) for i, t in valid_cells(mask)}


def fraction(cells: dict, condition) -> float:
    return sum(1 for value in cells.values() if condition(value)) / len(cells)


@pytest.mark.parametrize("low,high", [(0.0, 1.5), (0.5, 2.0)])
def test_tis_matches_loop(low, high):
    train, rollout, mask = batch()
    weights, metrics = tis_weights(train, rollout, mask, low=low, high=high)
    expected = ratios(train, rollout, mask)
    for (i, t), ratio in expected.items():
        assert weights[i, t].item() == pytest.approx(min(max(ratio, low), high), abs=1e-6)
    assert torch.equal(weights[mask == 0], torch.zeros_like(weights[mask == 0]))
    assert not weights.requires_grad
    assert metrics["tis_clipped_fraction_low"].item() == pytest.approx(fraction(expected, lambda r: r < low))
    assert metrics["tis_clipped_fraction_high"].item() == pytest.approx(fraction(expected, lambda r: r > high))
    mean_weight = sum(min(max(r, low), high) for r in expected.values()) / len(expected)
    assert metrics["tis_weight_mean"].item() == pytest.approx(mean_weight, abs=1e-6)
    assert metrics["tis_clipped_fraction_high"] > 0


def test_icepop_matches_loop():
    train, rollout, mask = batch()
    weights, metrics = icepop_weights(train, rollout, mask, low=0.5, high=2.0)
    expected = ratios(train, rollout, mask)
    for (i, t), ratio in expected.items():
        assert weights[i, t].item() == pytest.approx(ratio if 0.5 <= ratio <= 2.0 else 0.0, abs=1e-6)
    assert torch.equal(weights[mask == 0], torch.zeros_like(weights[mask == 0]))
    assert not weights.requires_grad
    assert metrics["icepop_masked_fraction_low"].item() == pytest.approx(fraction(expected, lambda r: r < 0.5))
    assert metrics["icepop_masked_fraction_high"].item() == pytest.approx(fraction(expected, lambda r: r > 2.0))
    assert metrics["icepop_masked_fraction_low"] > 0 and metrics["icepop_masked_fraction_high"] > 0


def test_mismatch_metrics_match_loop():
    train, rollout, mask = batch()
    metrics = mismatch_metrics(train, rollout, mask)
    differences = [train[i, t].item() - rollout[i, t].item() for i, t in valid_cells(mask)]
    assert metrics["logprob_diff_abs_mean"].item() == pytest.approx(sum(map(abs, differences)) / len(differences), abs=1e-6)
    assert metrics["logprob_diff_abs_max"].item() == pytest.approx(max(map(abs, differences)), abs=1e-6)
    kl = sum(math.exp(d) - 1 - d for d in differences) / len(differences)
    assert metrics["rollout_kl"].item() == pytest.approx(kl, abs=1e-6)


@pytest.mark.parametrize("function", [tis_weights, icepop_weights])
def test_masked_positions_change_nothing(function):
    train, rollout, mask = batch()
    clean = function(train, rollout, mask, low=0.5, high=1.5)
    dirty = function(with_garbage(train.detach(), mask, 1), with_garbage(rollout, mask, 2), mask, low=0.5, high=1.5)
    assert torch.equal(clean[0], dirty[0])
    assert all(torch.equal(clean[1][key], dirty[1][key]) for key in clean[1])
    clean_metrics = mismatch_metrics(train, rollout, mask)
    dirty_metrics = mismatch_metrics(with_garbage(train.detach(), mask, 1), with_garbage(rollout, mask, 2), mask)
    assert all(torch.equal(clean_metrics[key], dirty_metrics[key]) for key in clean_metrics)
