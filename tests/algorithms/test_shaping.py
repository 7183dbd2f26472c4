"""Reward shaping and filters against per-sample loops."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from megarl.algorithms.groups import EPS
from megarl.algorithms.shaping import (
    RunningMoments,
    clip_rewards,
    dynamic_sampling_keep,
    normalize_rewards,
    overlong_filter,
    overlong_penalty,
)

pytestmark = pytest.mark.cpu

SCORES = torch.tensor([3.0, -4.0, 0.5, 0.1, 0.1, 0.1, 2.0, 1.0, -1.0])
GROUP_IDS = torch.tensor([0, 0, 0, 5, 5, 5, 9, 2, 2])  # group 5 all equal, group 9 alone


def normalise_reference(values, subtract_mean):
    if len(set(values)) == 1:
        return [0.0 if subtract_mean else v for v in values]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return [((v - mean) if subtract_mean else v) / (std + EPS) for v in values]


def test_clip_rewards():
    assert torch.equal(clip_rewards(SCORES, 1.0), SCORES.clamp(-1, 1))
    assert clip_rewards(SCORES, None) is SCORES


@pytest.mark.parametrize("subtract_mean", [True, False])
def test_batch_and_group_normalisation_match_loop(subtract_mean):
    values = SCORES.double().tolist()
    batch = normalize_rewards(SCORES, "batch", subtract_mean=subtract_mean)
    assert (batch.double() - torch.tensor(normalise_reference(values, subtract_mean))).abs().max() <= 1e-6
    grouped = normalize_rewards(SCORES, "group", group_ids=GROUP_IDS, subtract_mean=subtract_mean)
    for group in GROUP_IDS.unique().tolist():
        rows = [i for i, g in enumerate(GROUP_IDS.tolist()) if g == group]
        expected = normalise_reference([values[i] for i in rows], subtract_mean)
        assert (grouped[rows].double() - torch.tensor(expected)).abs().max() <= 1e-6
    if subtract_mean:
        assert torch.equal(grouped[3:7], torch.zeros(4))  # exactly 0: all-equal group and the group of one


@pytest.mark.parametrize("subtract_mean", [True, False])
def test_running_normalisation_uses_everything_seen(subtract_mean):
    running = RunningMoments()
    seen = []
    for seed in range(4):
        batch = torch.randn(3 + seed, generator=torch.Generator().manual_seed(seed))
        seen += batch.double().tolist()
        normalised = normalize_rewards(batch, "running", running=running, subtract_mean=subtract_mean)
        assert running.count == len(seen)
        assert running.mean == pytest.approx(statistics.fmean(seen), abs=1e-12)
        assert running.std == pytest.approx(statistics.stdev(seen), abs=1e-12)
        mean, std = statistics.fmean(seen), statistics.stdev(seen)
        expected = [((v - mean) if subtract_mean else v) / (std + EPS) for v in batch.double().tolist()]
        assert (normalised.double() - torch.tensor(expected)).abs().max() <= 1e-6
    assert RunningMoments(**dataclasses.asdict(running)) == running


def test_running_normalisation_of_a_single_score():
    running = RunningMoments()
    assert normalize_rewards(torch.tensor([2.5]), "running", running=running).tolist() == [0.0]
    assert normalize_rewards(torch.tensor([2.5]), "running", running=RunningMoments(), subtract_mean=False).tolist() == [2.5]


def test_normalisation_errors():
    with pytest.raises(ValueError, match="choose one of none, batch, group, running"):
        normalize_rewards(SCORES, "whiten")
    with pytest.raises(ValueError, match="needs group_ids"):
        normalize_rewards(SCORES, "group")
    with pytest.raises(ValueError, match="needs its RunningMoments"):
        normalize_rewards(SCORES, "running")
    assert torch.equal(normalize_rewards(SCORES, "none"), SCORES)


def test_overlong_penalty_matches_loop():
    max_length, buffer_length, factor = 10, 4, 0.5
    lengths = torch.arange(0, 13)
    penalty = overlong_penalty(lengths, max_length=max_length, buffer_length=buffer_length, factor=factor)
    for length, value in zip(lengths.tolist(), penalty.tolist()):
        if length <= max_length - buffer_length:
            expected = 0.0
        elif length <= max_length:
            expected = -factor * (length - (max_length - buffer_length)) / buffer_length
        else:
            expected = -factor
        assert value == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=10, buffer_length=0, factor=1.0)


@pytest.mark.parametrize("drop_equal", [True, False])
@pytest.mark.parametrize("mean_range", [None, (0.2, 0.7)])
def test_dynamic_sampling_matches_loop(drop_equal, mean_range):
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 8, 6, 6])  # group 8 has one sample
    keep, counts = dynamic_sampling_keep(scores, group_ids, drop_equal=drop_equal, mean_range=mean_range)
    expected_counts = {"groups": 0, "groups_kept": 0, "groups_dropped_equal": 0, "groups_dropped_range": 0}
    members = {}
    for row, group in enumerate(group_ids.tolist()):
        members.setdefault(group, []).append(scores[row].item())
    verdict = {}
    for group, values in members.items():
        expected_counts["groups"] += 1
        mean = sum(values) / len(values)
        if drop_equal and len(set(values)) == 1:
            verdict[group] = "groups_dropped_equal"
        elif mean_range is not None and not mean_range[0] <= mean <= mean_range[1]:
            verdict[group] = "groups_dropped_range"
        else:
            verdict[group] = "groups_kept"
        expected_counts[verdict[group]] += 1
    expected_keep = [verdict[group] == "groups_kept" for group in group_ids.tolist()]
    assert keep.tolist() == expected_keep
    assert counts == expected_counts


def test_overlong_filter_zeroes_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kept, metrics = overlong_filter(mask, torch.tensor([False, True, False]))
    assert kept.dtype == torch.bool
    assert kept.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert metrics == {"overlong_filtered": 1}
