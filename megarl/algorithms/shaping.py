"""Reward shaping and sample filters, applied to scalar scores ``[B]`` before the advantages.

- ``clip_rewards``: r <- clip(r, -c, c).
- Normalisation (``normalize_rewards``): ``batch`` (r - mean) / (std + eps) over the batch,
  ``group`` the same within each prompt's group, ``running`` with a :class:`RunningMoments`
  state that keeps the mean and variance of every score seen so far (Welford/Chan's parallel
  update), so the scale is stable across steps.
- DAPO soft overlong penalty (Yu et al. 2025): with L the length limit and B the buffer, a response
  of length l gets 0 if l <= L - B, -(l - (L - B)) / B * factor if L - B < l <= L, -factor beyond.
- Dynamic sampling (DAPO): keep a prompt's group only if its scores are not all equal and, when a
  range is given, its mean lies in [low, high]; the counts go to the metrics.
- Overlong filtering: samples that stopped at the length limit (no EOS) leave the loss.
"""

from __future__ import annotations

import dataclasses

import torch

EPS = 1e-6


def clip_rewards(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``[B]`` scores clipped to [-limit, limit]; unchanged when ``limit`` is None."""
    return scores if limit is None else scores.clamp(-limit, limit)


@dataclasses.dataclass(slots=True)
class RunningMoments:
    """Mean and variance of every score seen, merged batch by batch (Chan et al. 1979)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, scores: torch.Tensor) -> None:
        values = scores.double()
        batch_count = values.numel()
        if batch_count == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0


def normalize_rewards(scores, mode: str, group_ids=None, running: RunningMoments | None = None) -> torch.Tensor:
    """Normalise ``[B]`` scores: ``none``, ``batch``, ``group`` (needs ``group_ids``) or ``running``
    (needs ``running``, which is updated with these scores first)."""
    values = scores.double()
    if mode == "none":
        return scores
    if mode == "batch":
        std = values.std() if values.numel() > 1 else torch.ones((), dtype=torch.float64)
        return ((values - values.mean()) / (std + EPS)).to(scores.dtype)
    if mode == "group":
        out = torch.zeros_like(values)
        for group in torch.unique(group_ids):
            members = group_ids == group
            group_values = values[members]
            std = group_values.std() if group_values.numel() > 1 else torch.ones((), dtype=torch.float64)
            out[members] = (group_values - group_values.mean()) / (std + EPS)
        return out.to(scores.dtype)
    if mode == "running":
        running.update(scores)
        return ((values - running.mean) / (running.std + EPS)).to(scores.dtype)
    raise ValueError(f"unknown reward normalisation {mode!r}; choose none, batch, group or running")


def overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer_length: int, factor: float) -> torch.Tensor:
    """DAPO's soft penalty per response, ``[B]`` (0 or negative)."""
    start = max_length - buffer_length
    excess = (response_lengths.double() - start).clamp(min=0)
    return (-(excess / buffer_length).clamp(max=1.0) * factor).to(torch.float32)


def dynamic_sampling_keep(scores, group_ids, mean_range: tuple[float, float] | None = None):
    """``[B]`` bool: samples of the groups to keep, and ``{"groups_kept", "groups_dropped_equal",
    "groups_dropped_range"}`` counts."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    counts = {"groups_kept": 0, "groups_dropped_equal": 0, "groups_dropped_range": 0}
    for group in torch.unique(group_ids):
        members = group_ids == group
        values = scores[members]
        if bool((values == values[0]).all()):
            counts["groups_dropped_equal"] += 1
        elif mean_range is not None and not mean_range[0] <= values.double().mean().item() <= mean_range[1]:
            counts["groups_dropped_range"] += 1
        else:
            counts["groups_kept"] += 1
            keep |= members
    return keep, counts


def overlong_filter(response_mask, truncated: torch.Tensor):
    """The response mask with the rows of ``truncated`` samples (cut at the limit) zeroed, and how
    many were."""
    kept = response_mask * (~truncated.bool())[:, None].to(response_mask.dtype)
    return kept, {"overlong_filtered": int(truncated.bool().sum())}
