"""The critic's loss against a per-token loop; masking never matters."""

from __future__ import annotations

import pytest
import torch
from algorithm_batches import response_mask, valid_cells, with_garbage

from megarl.algorithms.value_loss import value_loss

pytestmark = pytest.mark.cpu


def batch():
    generator = torch.Generator().manual_seed(1)
    values, old_values, returns = (torch.randn(5, 4, generator=generator) for _ in range(3))
    return values.requires_grad_(), old_values, returns, response_mask((4, 1, 3, 2, 4), 4)


@pytest.mark.parametrize("value_clip", [None, 0.2])
def test_value_loss_matches_loop(value_clip):
    values, old_values, returns, mask = batch()
    loss, metrics = value_loss(values, old_values, returns, mask, value_clip=value_clip)
    loss.sum().backward()
    clipped_tokens = 0
    cells = list(valid_cells(mask))
    for i, t in cells:
        v, old, target = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
        unclipped = (v - target) ** 2
        clipped = unclipped if value_clip is None else (old + min(max(v - old, -value_clip), value_clip) - target) ** 2
        assert loss[i, t].item() == pytest.approx(0.5 * max(unclipped, clipped), abs=1e-6)
        gradient = 0.0 if clipped > unclipped else v - target
        assert values.grad[i, t].item() == pytest.approx(gradient, abs=1e-6)
        clipped_tokens += clipped > unclipped
    assert metrics["value_clip_fraction"].item() == pytest.approx(clipped_tokens / len(cells))
    if value_clip is not None:
        assert 0 < clipped_tokens < len(cells)
    assert torch.equal(loss[mask == 0], torch.zeros_like(loss[mask == 0]))


def test_masked_positions_change_nothing():
    values, old_values, returns, mask = batch()
    clean = value_loss(values, old_values, returns, mask, value_clip=0.2)
    noisy = (with_garbage(x.detach(), mask, seed) for seed, x in enumerate((values, old_values, returns)))
    dirty = value_loss(*noisy, mask, value_clip=0.2)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1]["value_clip_fraction"], dirty[1]["value_clip_fraction"])
