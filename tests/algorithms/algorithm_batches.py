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
