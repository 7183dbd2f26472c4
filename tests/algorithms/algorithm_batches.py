"""Small batches shared by the algorithm tests: right-padded masks, garbage at masked positions."""

from __future__ import annotations

import torch


def response_mask(lengths, horizon: int, holes=()) -> torch.Tensor:
    """``[B, horizon]`` float mask with ``lengths[i]`` leading ones per row, then zeros at the
    ``(row, position)`` pairs of ``holes`` (tokens masked inside a response)."""
    mask = torch.zeros(len(lengths), horizon)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    for row, position in holes:
        mask[row, position] = 0
    return mask


def with_garbage(tensor: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``tensor`` with large random values wherever ``mask`` is 0."""
    generator = torch.Generator().manual_seed(seed)
    noise = 1e6 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    return torch.where(mask.bool(), tensor, noise)


def valid_cells(mask: torch.Tensor):
    """Every ``(row, position)`` where ``mask`` is 1, row by row."""
    for row, values in enumerate(mask.tolist()):
        for position, keep in enumerate(values):
            if keep:
                yield row, position


def split_gradient(inputs: dict, loss, parts, lengths, mode: str, horizon: int) -> torch.Tensor:
    """The gradient of a batch's loss with respect to its log-probs when its rows are cut into
    ``parts`` (micro-batches or ranks), each part cut to its own padded length (``lengths`` per
    row) and aggregated under ``mode`` with the whole batch's normaliser (``horizon``: the
    ``seq-mean-token-sum-norm`` length). ``loss(part)`` is the per-token loss of a part."""
    from megarl.algorithms.aggregation import aggregate_loss, normalizer

    total = normalizer(mode, inputs["response_mask"], horizon)
    log_probs = inputs["log_probs"].detach().clone().requires_grad_()
    for rows in parts:
        length = max(lengths[row] for row in rows)
        part = {key: value[rows, :length] for key, value in {**inputs, "log_probs": log_probs}.items()}
        aggregate_loss(loss(part), part["response_mask"], mode, total).backward()
    return log_probs.grad


def assert_matches_reference(loss, metrics: dict, inputs: dict, expected_loss, expected_gradient, expected_metrics: dict) -> None:
    """A policy loss's per-token loss, its gradient (``loss.sum()`` backwards into
    ``inputs["log_probs"]``) and its metrics (0-d, detached) equal a naive loop's to 1e-6."""
    import pytest

    assert (loss.detach().double() - expected_loss).abs().max() <= 1e-6
    loss.sum().backward()
    assert (inputs["log_probs"].grad.double() - expected_gradient).abs().max() <= 1e-6
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key].item() == pytest.approx(value, abs=1e-6), key
        assert metrics[key].ndim == 0 and not metrics[key].requires_grad
