"""Group statistics against a per-group loop."""

from __future__ import annotations

import statistics

import pytest
import torch

from megarl.algorithms.groups import group_statistics

pytestmark = pytest.mark.cpu


def test_group_statistics_match_loop():
    values = torch.tensor([0.3, -1.0, 2.5, 0.7, 0.7, 4.0, 1.5, 0.2, 0.2])
    group_ids = torch.tensor([7, 3, 7, 5, 5, 11, 3, 7, 3])  # sizes 3, 3, 2, 1; ids out of order
    result = group_statistics(values, group_ids)
    for i, group in enumerate(group_ids.tolist()):
        members = [v for v, g in zip(values.double().tolist(), group_ids.tolist()) if g == group]
        assert result.mean[i].item() == pytest.approx(statistics.fmean(members), abs=1e-12)
        expected_std = statistics.stdev(members) if len(members) > 1 else 0.0
        assert result.std[i].item() == pytest.approx(expected_std, abs=1e-12)
        assert result.size[i].item() == len(members)
        assert result.all_equal[i].item() == (len(set(members)) == 1)
    assert result.mean.dtype == torch.float64


def test_all_equal_is_exact_where_the_std_is_not():
    values = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    result = group_statistics(values, torch.zeros(3, dtype=torch.long))
    assert result.all_equal.all()
    # Rounding leaves mean != 0.1 and std ~ 1e-17: only the flag can give an exact 0 advantage.
    assert (result.std > 0).all()
