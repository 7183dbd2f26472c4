"""Reward shaping and sample filters, on scalar scores ``[B]`` before the advantage estimator.

- ``clip_rewards``: r <- clip(r, -c, c).
- ``normalize_rewards``: r <- (r - mean) / scale, or r / scale without ``subtract_mean`` (ROLL's
  ``reward_scale``, LightRFT's running norm without ``minus_mean``), where scale = std + eps
  (unbiased std, eps = 1e-6) and mean, std are taken over the ``batch``, each prompt's ``group``,
  or everything seen so far (``running``, a :class:`RunningMoments` state updated with this batch
  first). Where the statistics have no spread (a single score, or all equal) the scale is 1 and, with
  ``subtract_mean``, the result is exactly 0.
- DAPO soft overlong penalty (Yu et al. 2025), with L the length limit and B the buffer: a response
  of length l gets 0 if l <= L - B, -factor (l - (L - B)) / B if L - B < l <= L, -factor beyond L.
  Added to the score by the caller.
- Dynamic sampling (DAPO): keep a prompt's group only if its scores are not all equal (they would
  get advantage 0) and, when a range is given, its mean lies in [low, high] (inclusive).
- Overlong filtering (DAPO): responses cut at the length limit (no EOS) leave the loss: their mask
  rows become 0, so they also leave every aggregation normaliser.
"""

from __future__ import annotations

import dataclasses

import torch

from megarl.algorithms.groups import EPS, group_statistics

NORMALIZATIONS = ("none", "batch", "group", "running")


def clip_rewards(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``[B]`` scores clipped to [-limit, limit]; returned unchanged when ``limit`` is None."""
    return scores if limit is None else scores.clamp(-limit, limit)


@dataclasses.dataclass(slots=True)
class RunningMoments:
    """Count, mean and sum of squared deviations (m2) of every score seen, merged batch by batch
    with Chan et al.'s parallel update (exact, unlike an EMA):

        n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
        m2 = m2_a + m2_b + delta^2 n_a n_b / n.

    A dataclass of floats: ``dataclasses.asdict`` / ``RunningMoments(**state)`` checkpoint it.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, scores: torch.Tensor) -> None:
        """Merge the ``[B]`` scores into the moments."""
        values = scores.double()
        batch_count = values.numel()
        if batch_count == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = (values - batch_mean).square().sum().item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen; 0 with fewer than two scores."""
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 0.0


def normalize_rewards(
    scores: torch.Tensor,
    mode: str,
    *,
    group_ids: torch.Tensor | None = None,
    running: RunningMoments | None = None,
    subtract_mean: bool = True,
) -> torch.Tensor:
    """Normalise scores (see the module docstring).

    Args:
        scores: ``[B]``.
        mode: one of :data:`NORMALIZATIONS` (``algorithm.reward_norm``).
        group_ids: ``[B]``, needed by ``group``.
        running: the state of ``running``; updated with ``scores`` before normalising.
        subtract_mean: centre as well as scale.

    Returns:
        ``[B]`` in the promoted floating dtype of ``scores`` (at least float32).
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown reward normalisation {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    values = scores.double()
    if mode == "none":
        return scores.to(dtype)
    if mode == "running":
        if running is None:
            raise ValueError("reward normalisation 'running' needs its RunningMoments state")
        running.update(scores)
        mean = torch.full_like(values, running.mean)
        std = torch.full_like(values, running.std)
        no_spread = std == 0
    else:
        if mode == "group" and group_ids is None:
            raise ValueError("reward normalisation 'group' needs group_ids")
        ids = group_ids if mode == "group" else torch.zeros_like(values, dtype=torch.long)
        statistics = group_statistics(values, ids)
        mean, std, no_spread = statistics.mean, statistics.std, statistics.all_equal
    scale = torch.where(no_spread, 1.0, std + EPS)
    if not subtract_mean:
        return (values / scale).to(dtype)
    return torch.where(no_spread, 0.0, (values - mean) / scale).to(dtype)


def overlong_penalty(response_lengths: torch.Tensor, *, max_length: int, buffer_length: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong penalty per response (0 or negative).

    Args:
        response_lengths: ``[B]`` response tokens generated.
        max_length: L, the response length limit.
        buffer_length: B, the tokens before L over which the penalty ramps (0 < B <= L).
        factor: the penalty at and beyond L.

    Returns:
        ``[B]`` float32: -factor * min(max(l - (L - B), 0) / B, 1).
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"overlong buffer_length ({buffer_length}) must be in (0, max_length = {max_length}]")
    excess = (response_lengths.double() - (max_length - buffer_length)).clamp(min=0)
    return (-factor * (excess / buffer_length).clamp(max=1.0)).float()


def dynamic_sampling_keep(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    drop_equal: bool = True,
    mean_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """DAPO's dynamic sampling filter over prompt groups.

    Args:
        scores: ``[B]``.
        group_ids: ``[B]``.
        drop_equal: drop the groups whose scores are all equal (including groups of one).
        mean_range: ``(low, high)``: drop the groups whose mean is outside [low, high].

    Returns:
        ``(keep, counts)``: ``keep: [B]`` bool, True on every sample of a kept group (index the
        batch with it); ``counts`` (ints, for metrics): ``groups``, ``groups_kept``,
        ``groups_dropped_equal``, ``groups_dropped_range`` (a group failing both counts as equal).
    """
    statistics = group_statistics(scores, group_ids)
    dropped_equal = statistics.all_equal if drop_equal else torch.zeros_like(statistics.all_equal)
    if mean_range is None:
        outside = torch.zeros_like(dropped_equal)
    else:
        low, high = mean_range
        outside = (statistics.mean < low) | (statistics.mean > high)
    dropped_range = outside & ~dropped_equal
    keep = ~dropped_equal & ~dropped_range

    def count(members: torch.Tensor) -> int:
        return torch.unique(group_ids[members]).numel()

    counts = {
        "groups": count(torch.ones_like(keep)),
        "groups_kept": count(keep),
        "groups_dropped_equal": count(dropped_equal),
        "groups_dropped_range": count(dropped_range),
    }
    return keep, counts


def overlong_filter(response_mask: torch.Tensor, truncated: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """Remove the responses cut at the length limit from the loss.

    Args:
        response_mask: ``[B, T]``.
        truncated: ``[B]`` bool, the response hit the length limit without an EOS.

    Returns:
        ``(response_mask, metrics)``: the mask with the truncated rows zeroed (same dtype), and
        ``overlong_filtered``, how many responses were.
    """
    truncated = truncated.bool()
    kept = torch.where(truncated[:, None], torch.zeros_like(response_mask), response_mask)
    return kept, {"overlong_filtered": int(truncated.sum())}
