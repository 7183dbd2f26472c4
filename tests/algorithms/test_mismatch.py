"""Train/rollout corrections (TIS, ICEPOP, sequence-level importance sampling, rejection sampling) and
mismatch metrics against per-token and per-sequence loops."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import response_mask, valid_cells, with_garbage
from test_aggregation import SPLITS

from megarl.algorithms.mismatch import (
    ROLLOUT_IS_LEVELS,
    ROLLOUT_RS_CRITERIA,
    icepop_weights,
    mismatch_metrics,
    rejection_mask,
    sequence_is_weights,
    tis_weights,
)

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


# Rows of several lengths, a hole inside row 0, and row 4 filtered out (no valid token).
SEQUENCE_LENGTHS = (7, 1, 4, 6, 0, 5, 3, 7, 2, 5)
HORIZON = 7


def sequence_batch():
    """``(train, rollout, mask)`` in float64, ten rows whose engine log-probs are off by ~0.3."""
    generator = torch.Generator().manual_seed(1)
    shape = (len(SEQUENCE_LENGTHS), HORIZON)
    train = -3 * torch.rand(shape, generator=generator, dtype=torch.float64)
    rollout = train + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return train, rollout, response_mask(SEQUENCE_LENGTHS, HORIZON, holes=[(0, 3)]).double()


def sequences(train, rollout, mask) -> dict[int, list[float]]:
    """Each row with a valid token: its log w_t = train - rollout, one per valid token."""
    rows: dict[int, list[float]] = {}
    for i, t in valid_cells(mask):
        rows.setdefault(i, []).append(train[i, t].item() - rollout[i, t].item())
    return rows


@pytest.mark.parametrize("threshold", [1.2, 2.0])
@pytest.mark.parametrize("level", ROLLOUT_IS_LEVELS)
def test_sequence_is_matches_loop(level, threshold):
    train, rollout, mask = sequence_batch()
    weights, metrics = sequence_is_weights(train.requires_grad_(), rollout, mask, level=level, threshold=threshold)
    assert not weights.requires_grad
    assert torch.equal(weights[mask == 0], torch.zeros_like(weights[mask == 0]))
    rows = sequences(train, rollout, mask)
    log_weights = {i: (sum(logs) if level == "sequence" else sum(logs) / len(logs)) for i, logs in rows.items()}
    untruncated = {i: math.exp(min(max(value, -20), 20)) for i, value in log_weights.items()}
    for i, t in valid_cells(mask):
        assert weights[i, t].item() == pytest.approx(min(untruncated[i], threshold), abs=1e-6)
    per_token = [untruncated[i] for i, _ in valid_cells(mask)]
    assert metrics["rollout_is_mean"].item() == pytest.approx(sum(per_token) / len(per_token), abs=1e-6)
    assert metrics["rollout_is_max"].item() == pytest.approx(max(untruncated.values()), abs=1e-6)
    assert metrics["rollout_is_min"].item() == pytest.approx(min(untruncated.values()), abs=1e-6)
    assert metrics["rollout_is_ratio_fraction_high"].item() == pytest.approx(fraction(untruncated, lambda w: w > threshold))
    assert metrics["rollout_is_ratio_fraction_low"].item() == pytest.approx(fraction(untruncated, lambda w: w < 1 / threshold))
    bounded = [min(max(w, 1 / threshold), threshold) for w in per_token]
    mean = sum(bounded) / len(bounded)
    ess = 1 / (sum((w / mean) ** 2 for w in bounded) / len(bounded))
    assert metrics["rollout_is_eff_sample_size"].item() == pytest.approx(ess, abs=1e-6)
    if level == "sequence":
        assert metrics["rollout_is_ratio_fraction_high"] > 0 and metrics["rollout_is_ratio_fraction_low"] > 0


def divergence(log_ratio: float, estimator: str) -> float:
    log_ratio = min(max(log_ratio, -20), 20)
    return {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": math.exp(log_ratio) - 1 - log_ratio}[estimator]


def loop_statistics(rows: dict[int, list[float]], criterion: str) -> dict:
    """The criterion's statistic per token ``{(i, k): s}`` or per sequence ``{i: s}``."""
    estimator = criterion[-2:]
    if criterion.startswith("token_"):
        return {(i, k): divergence(value, estimator) for i, logs in rows.items() for k, value in enumerate(logs)}
    aggregate = {"sum": sum, "mean": lambda values: sum(values) / len(values), "max": max}[criterion.split("_")[1]]
    return {i: aggregate([divergence(value, estimator) for value in logs]) for i, logs in rows.items()}


def bounds(statistics: dict, criterion: str, explicit_lower: bool) -> tuple[float, float | None]:
    """Thresholds that reject some units and keep others: near the statistic's quartiles (its exp for
    k1), half-way between two of its values so that no value sits on a bound."""
    ordered = sorted(statistics.values())

    def between(index: int) -> float:
        return (ordered[index] + ordered[index + 1]) / 2

    quartile, three_quartiles = between(len(ordered) // 4), between(3 * len(ordered) // 4)
    if not criterion.endswith("k1"):
        return three_quartiles, None
    if explicit_lower:
        return math.exp(three_quartiles), math.exp(quartile)
    return math.exp(max(abs(quartile), abs(three_quartiles))), None


RS_CASES = [(criterion, False) for criterion in ROLLOUT_RS_CRITERIA] + [
    (criterion, True) for criterion in ROLLOUT_RS_CRITERIA if criterion.endswith("k1")
]


@pytest.mark.parametrize("criterion,explicit_lower", RS_CASES)
def test_rejection_matches_loop(criterion, explicit_lower):
    train, rollout, mask = sequence_batch()
    rows = sequences(train, rollout, mask)
    statistics = loop_statistics(rows, criterion)
    upper, lower = bounds(statistics, criterion, explicit_lower)
    keep, metrics = rejection_mask(train, rollout, mask, criterion=criterion, upper=upper, lower=lower)

    k1 = criterion.endswith("k1")
    high = math.log(upper) if k1 else upper
    low = math.log(lower if lower is not None else 1 / upper) if k1 else -math.inf
    rejected_units = {unit for unit, value in statistics.items() if value > high or value < low}
    token_level = criterion.startswith("token_")
    expected_keep = torch.zeros_like(keep)
    rejected_tokens, rejected_rows = 0, set()
    for i, logs in rows.items():
        positions = [t for row, t in valid_cells(mask) if row == i]
        for k, t in enumerate(positions):
            rejected = ((i, k) if token_level else i) in rejected_units
            expected_keep[i, t] = not rejected
            rejected_tokens += rejected
            if rejected:
                rejected_rows.add(i)
    assert torch.equal(keep, expected_keep)
    tokens = sum(len(logs) for logs in rows.values())
    assert 0 < rejected_tokens < tokens
    assert metrics["rollout_rs_masked_fraction"].item() == pytest.approx(rejected_tokens / tokens, abs=1e-6)
    assert metrics["rollout_rs_seq_masked_fraction"].item() == pytest.approx(len(rejected_rows) / len(rows), abs=1e-6)

    prefix = f"rollout_rs_{criterion}"
    per_token = statistics.values() if token_level else [statistics[i] for i, logs in rows.items() for _ in logs]
    assert metrics[f"{prefix}_mean"].item() == pytest.approx(sum(per_token) / tokens, abs=1e-6)
    assert metrics[f"{prefix}_max"].item() == pytest.approx(max(statistics.values()), abs=1e-6)
    assert metrics[f"{prefix}_min"].item() == pytest.approx(min(statistics.values()), abs=1e-6)
    assert metrics[f"{prefix}_fraction_high"].item() == pytest.approx(fraction(statistics, lambda s: s > high), abs=1e-6)
    assert (f"{prefix}_fraction_low" in metrics) == k1
    if k1:
        assert metrics[f"{prefix}_fraction_low"].item() == pytest.approx(fraction(statistics, lambda s: s < low), abs=1e-6)


def test_rejection_refuses_unknown_criteria_and_lower_bounds_without_k1():
    train, rollout, mask = sequence_batch()
    with pytest.raises(ValueError, match="'seq_max_k1' is not one of"):
        rejection_mask(train, rollout, mask, criterion="seq_max_k1", upper=2.0)
    with pytest.raises(ValueError, match="'token_k3' has no lower bound"):
        rejection_mask(train, rollout, mask, criterion="token_k3", upper=2.0, lower=0.5)


def corrections():
    """Each new correction as ``function(train, rollout, mask) -> (tensor [B, T], metrics)``."""
    for level in ROLLOUT_IS_LEVELS:
        yield level, lambda train, rollout, mask, level=level: sequence_is_weights(train, rollout, mask, level=level, threshold=1.5)
    for criterion in ROLLOUT_RS_CRITERIA:
        upper = 1.3 if criterion.endswith("k1") else 0.05
        yield criterion, lambda train, rollout, mask, criterion=criterion, upper=upper: rejection_mask(
            train, rollout, mask, criterion=criterion, upper=upper
        )


@pytest.mark.parametrize("name,correction", list(corrections()))
def test_new_corrections_ignore_masked_positions(name, correction):
    train, rollout, mask = sequence_batch()
    clean = correction(train, rollout, mask)
    dirty = correction(with_garbage(train, mask, 1), with_garbage(rollout, mask, 2), mask)
    assert torch.equal(clean[0], dirty[0])
    assert all(torch.equal(clean[1][key], dirty[1][key]) for key in clean[1])


@pytest.mark.parametrize("split", [name for name in SPLITS if name != "1 micro-batch"])
@pytest.mark.parametrize("name,correction", list(corrections()))
def test_a_sequence_gets_the_same_correction_in_any_micro_batch_or_rank(name, correction, split):
    """Each micro-batch computed on its own, cut to its own padded length, gives its rows exactly the
    weights (or kept tokens) of the whole batch."""
    train, rollout, mask = sequence_batch()
    whole, _ = correction(train, rollout, mask)
    for rank in SPLITS[split]:
        for rows in rank:
            length = max(1, max(SEQUENCE_LENGTHS[row] for row in rows))
            part, _ = correction(train[rows, :length], rollout[rows, :length], mask[rows, :length])
            assert torch.equal(part, whole[rows, :length])
            assert not whole[rows, length:].any()
