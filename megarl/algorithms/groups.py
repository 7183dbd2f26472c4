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
