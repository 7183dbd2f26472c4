"""Reward shaping, filters and the train/rollout mismatch corrections."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megarl.algorithms.mismatch import icepop_mask, mismatch_metrics, tis_weights
from megarl.algorithms.shaping import (
    EPS,
    RunningMoments,
    clip_rewards,
    dynamic_sampling_keep,
    normalize_rewards,
    overlong_filter,
    overlong_penalty,
)

pytestmark = pytest.mark.cpu


def test_clip_and_batch_group_normalisation_match_loops():
    scores = torch.tensor([3.0, -4.0, 0.5, 1.0, 1.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert torch.equal(clip_rewards(scores, 1.0), torch.tensor([1.0, -1.0, 0.5, 1.0, 1.0, 1.0]))
    values = scores.tolist()
    mean, std = statistics.mean(values), statistics.stdev(values)
    expected = [(v - mean) / (std + EPS) for v in values]
    assert (normalize_rewards(scores, "batch") - torch.tensor(expected)).abs().max() <= 1e-6
    grouped = normalize_rewards(scores, "group", group_ids=groups)
    first = values[:3]
    expected_first = [(v - statistics.mean(first)) / (statistics.stdev(first) + EPS) for v in first]
    assert (grouped[:3] - torch.tensor(expected_first)).abs().max() <= 1e-6
    assert torch.equal(grouped[3:], torch.zeros(3))


def test_running_moments_equal_statistics_of_everything_seen():
    running = RunningMoments()
    seen = []
    for seed in range(4):
        batch = torch.randn(5 + seed, generator=torch.Generator().manual_seed(seed))
        seen += batch.tolist()
        normalized = normalize_rewards(batch, "running", running=running)
        assert running.mean == pytest.approx(statistics.mean(seen), abs=1e-9)
        assert running.std == pytest.approx(statistics.stdev(seen), abs=1e-9)
        expected = [(v - statistics.mean(seen)) / (statistics.stdev(seen) + EPS) for v in batch.tolist()]
        assert (normalized - torch.tensor(expected)).abs().max() <= 1e-6


def test_overlong_penalty_ramps_in_the_buffer():
    lengths = torch.tensor([4, 6, 7, 8, 9])
    penalty = overlong_penalty(lengths, max_length=8, buffer_length=4, factor=1.0)
    assert torch.allclose(penalty, torch.tensor([0.0, -0.5, -0.75, -1.0, -1.0]))


def test_dynamic_sampling_drops_equal_and_out_of_range_groups():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep, counts = dynamic_sampling_keep(scores, groups)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    assert counts == {"groups_kept": 2, "groups_dropped_equal": 2, "groups_dropped_range": 0}
    # Group means 2/3 and 1/3; only the first lies in [0.5, 0.7].
    keep, counts = dynamic_sampling_keep(torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1]), (0.5, 0.7))
    assert counts == {"groups_kept": 1, "groups_dropped_equal": 0, "groups_dropped_range": 1}
    assert keep.tolist() == [True, True, True, False, False, False]


def test_overlong_filter_zeroes_truncated_rows():
    mask = torch.ones(3, 2)
    kept, metrics = overlong_filter(mask, torch.tensor([False, True, False]))
    assert kept.tolist() == [[1, 1], [0, 0], [1, 1]] and metrics == {"overlong_filtered": 1}


def mismatch_batch():
    train = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 7.0]])
    rollout = torch.tensor([[-1.2, -1.0, -0.5], [-0.1, -3.5, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return train, rollout, mask


def test_tis_weights_and_icepop_match_loops():
    train, rollout, mask = mismatch_batch()
    weights, metrics = tis_weights(train, rollout, mask, 0.0, 1.5)
    ratios = [[math.exp(a - b) for a, b in zip(r1, r2)] for r1, r2 in zip(train.tolist(), rollout.tolist())]
    expected = [[min(max(w, 0.0), 1.5) * m for w, m in zip(row, mrow)] for row, mrow in zip(ratios, mask.tolist())]
    assert (weights - torch.tensor(expected)).abs().max() <= 1e-6
    # Ratios 1.22, 0.37, 1 | 1, 1.65: only 1.65 is truncated.
    assert metrics["tis_truncated_fraction"].item() == pytest.approx(1 / 5)
    keep, metrics = icepop_mask(train, rollout, mask, 0.5, 1.5)
    assert keep.tolist() == [[1, 0, 1], [1, 0, 0]]
    assert metrics["icepop_masked_fraction"].item() == pytest.approx(2 / 5)


def test_mismatch_metrics_ignore_masked_tokens():
    train, rollout, mask = mismatch_batch()
    metrics = mismatch_metrics(train, rollout, mask)
    assert metrics["logprob_mismatch_mean"].item() == pytest.approx((0.2 + 1.0 + 0 + 0 + 0.5) / 5)
    assert metrics["logprob_mismatch_max"].item() == pytest.approx(1.0)
