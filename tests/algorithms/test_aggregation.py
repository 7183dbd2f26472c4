"""Loss aggregation: micro-batch and data-parallel splits give the full-batch gradient."""

from __future__ import annotations

import pytest
import torch

from megarl.algorithms.aggregation import MODES, aggregate_loss, normalizer

pytestmark = pytest.mark.cpu

LENGTHS = [7, 1, 4, 6, 2, 5, 3, 7]
HORIZON = 7


def data():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(len(LENGTHS), HORIZON)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    mask[1] = 0  # a response fully masked (filtered) counts nowhere
    inputs = torch.randn(len(LENGTHS), HORIZON, generator=generator, dtype=torch.float64)
    return inputs, mask


def per_token_loss(weight, inputs):
    return (inputs * weight) ** 2 - inputs * weight


def gradient(mode, splits, ranks=1):
    """Gradient of the mini-batch loss computed as the sum over ranks x micro-batches."""
    inputs, mask = data()
    weight = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    total = normalizer(mode, mask, HORIZON)  # what the trainer all-reduces
    rank_rows = torch.tensor_split(torch.arange(len(LENGTHS)), ranks)
    for rows in rank_rows:
        for micro in torch.tensor_split(rows, splits):
            # Each micro-batch keeps only its own (possibly shorter) padded length.
            length = int(mask[micro].sum(-1).max().item()) or 1
            loss = aggregate_loss(per_token_loss(weight, inputs[micro, :length]), mask[micro, :length], mode, total)
            loss.backward()
    return weight.grad


def reference(mode):
    inputs, mask = data()
    losses = per_token_loss(0.3, inputs).tolist()
    valid_rows = [r for r in range(len(LENGTHS)) if mask[r].sum() > 0]
    token_sums = {r: sum(l for l, m in zip(losses[r], mask[r].tolist()) if m) for r in valid_rows}
    lengths = {r: mask[r].sum().item() for r in valid_rows}
    if mode == "token-mean":
        return sum(token_sums.values()) / sum(lengths.values())
    if mode == "seq-mean-token-sum":
        return sum(token_sums.values()) / len(valid_rows)
    if mode == "seq-mean-token-mean":
        return sum(token_sums[r] / lengths[r] for r in valid_rows) / len(valid_rows)
    return sum(token_sums.values()) / (len(valid_rows) * HORIZON)


@pytest.mark.parametrize("mode", MODES)
def test_full_batch_loss_matches_loop(mode):
    inputs, mask = data()
    loss = aggregate_loss(per_token_loss(0.3, inputs), mask, mode, normalizer(mode, mask, HORIZON))
    assert loss.item() == pytest.approx(reference(mode), abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits,ranks", [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_micro_batches_and_ranks_give_the_full_batch_gradient(mode, splits, ranks):
    assert abs(gradient(mode, splits, ranks) - gradient(mode, 1)).item() <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_are_never_read(mode):
    inputs, mask = data()
    losses = per_token_loss(0.3, inputs)
    noisy = torch.where(mask.bool(), losses, torch.full_like(losses, 1e30))
    total = normalizer(mode, mask, HORIZON)
    assert torch.equal(aggregate_loss(losses, mask, mode, total), aggregate_loss(noisy, mask, mode, total))


def test_unknown_mode():
    with pytest.raises(ValueError, match="choose one of token-mean"):
        normalizer("mean", torch.ones(1, 1), 1)
