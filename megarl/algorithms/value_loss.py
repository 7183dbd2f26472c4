"""The critic's loss (PPO with GAE), per token, to MINIMISE.

l_t = 0.5 (V_t - R_t)^2, with R the returns of :func:`megarl.algorithms.advantages.gae`. With value
clipping (Schulman et al. 2017's implementation, verl's ``cliprange_value``) the new value may not
gain from moving further than ``value_clip`` from the value V_old that produced the returns:

    V_clip = V_old + clip(V - V_old, -value_clip, value_clip)
    l_t    = 0.5 max((V - R)^2, (V_clip - R)^2)

Aggregation over tokens is separate (:mod:`megarl.algorithms.aggregation`).
"""

from __future__ import annotations

import torch

from megarl.algorithms.aggregation import masked_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    value_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token (clipped) squared error of the critic.

    Args:
        values: ``[B, T]``, the critic being trained, differentiable.
        old_values: ``[B, T]``, the critic's values when the batch was made (those used by GAE).
        returns: ``[B, T]``, the regression targets.
        response_mask: ``[B, T]``.
        value_clip: the clip range, or None for the plain squared error.

    Returns:
        ``(per_token_loss [B, T], metrics)``: 0 where masked; ``value_clip_fraction`` (the clipped
        term is the larger, so the token has no gradient) over valid tokens, 0 without clipping.
    """
    mask = response_mask.bool()
    values, old_values, returns = (torch.where(mask, tensor, 0.0) for tensor in (values, old_values, returns))
    unclipped = (values - returns).square()
    if value_clip is None:
        clipped_active = torch.zeros_like(mask)
        loss = 0.5 * unclipped
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (clipped_values - returns).square()
        clipped_active = clipped > unclipped
        loss = 0.5 * torch.maximum(unclipped, clipped)
    metrics = {"value_clip_fraction": masked_mean(clipped_active.to(values.dtype), response_mask).detach()}
    return torch.where(mask, loss, 0.0), metrics
