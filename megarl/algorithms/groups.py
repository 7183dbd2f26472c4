"""Statistics of the groups of responses that share a prompt.

``group_ids: [B]`` holds any integers; responses with the same id answer the same prompt. Groups
may have different sizes (after filtering, or when a sample failed). Every statistic is returned
per sample (``[B]``, the value of the sample's group) so that callers broadcast without indexing.
Everything is computed in float64: a group whose values are all equal is detected exactly
(``all_equal``), not through a standard deviation that rounding may leave at 1e-17.
"""

from __future__ import annotations

import dataclasses

import torch

EPS = 1e-6
"""Added to every standard deviation that divides (verl's GRPO epsilon)."""


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStatistics:
    """Per-sample statistics of the sample's group, all ``[B]``."""

    mean: torch.Tensor
    """float64, mean_g = sum_{j in g} v_j / n_g."""
    std: torch.Tensor
    """float64, unbiased: sqrt(sum_{j in g} (v_j - mean_g)^2 / (n_g - 1)); 0 for a group of one."""
    size: torch.Tensor
    """int64, n_g."""
    all_equal: torch.Tensor
    """bool, every value of the group is the same (always true for a group of one)."""
    max: torch.Tensor
    """float64, the group's largest value."""


def group_statistics(values: torch.Tensor, group_ids: torch.Tensor) -> GroupStatistics:
    """Mean, unbiased std, size, all-equal flag and largest value of each sample's group.

    Args:
        values: ``[B]`` one number per response (a score).
        group_ids: ``[B]`` integer id of the prompt each response answers.
    """
    _, index, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = sizes.numel()
    values64 = values.double()
    sums = values64.new_zeros(num_groups).index_add_(0, index, values64)
    means = sums / sizes
    squares = values64.new_zeros(num_groups).index_add_(0, index, (values64 - means[index]).square())
    stds = torch.sqrt(squares / (sizes - 1).clamp(min=1))
    highs = values64.new_full((num_groups,), -torch.inf).scatter_reduce(0, index, values64, "amax")
    lows = values64.new_full((num_groups,), torch.inf).scatter_reduce(0, index, values64, "amin")
    return GroupStatistics(mean=means[index], std=stds[index], size=sizes[index], all_equal=(highs == lows)[index], max=highs[index])


def leave_one_out_token_means(values: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each token's mean of the same position's values over the other responses of its group.

    With g(i) the group of response i and V_t(i) = {j in g(i), j != i : valid[j, t]}:
    out[i, t] = sum_{j in V_t(i)} values[j, t] / |V_t(i)|, and 0 where V_t(i) is empty. It does
    not read response i itself, so as a baseline for response i it adds no bias (the responses of a
    group are sampled independently).

    Args:
        values: ``[B, T]`` a number per token (anything where ``valid`` is 0).
        valid: ``[B, T]`` 1 (or true) on the tokens that count.
        group_ids: ``[B]`` integer id of the prompt each response answers.

    Returns:
        ``[B, T]`` float64.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    present = valid.bool()
    counted = torch.where(present, values.double(), 0.0)
    weights = present.double()
    sums = counted.new_zeros(num_groups, values.shape[1]).index_add_(0, index, counted)
    counts = counted.new_zeros(num_groups, values.shape[1]).index_add_(0, index, weights)
    others = counts[index] - weights
    return torch.where(others > 0, (sums[index] - counted) / others.clamp(min=1), 0.0)
