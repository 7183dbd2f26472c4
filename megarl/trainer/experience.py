"""From scored samples to what the update trains on: shaped scores, advantages, loss weights.

Each function is one stage of the RL step in ``docs/rl_step.md`` and works on the whole
:class:`~megarl.trainer.batch.TrainBatch`, identically on every rank:

1. :func:`shape_scores`: reward clipping, DAPO's overlong penalty, normalisation.
2. :func:`compute_advantages`: the outcome score on each response's last token, minus the KL
   penalty when ``algorithm.use_kl_in_reward``, through the configured estimator. Outcome
   estimators (grpo, rloo, ...) score a response by the sum of its token rewards, which is the
   shaped score without a KL penalty (verl's convention). An estimator that reads the rollout
   importance weights (``rollout_is_weights``: the optimal token baseline) gets the loss weights
   of stage 4 as they would be on the responses before the overlong filter, rejected tokens 0
   (verl computes its rollout correction before the advantages, and its rejection sampling takes
   the rejected tokens out of the mask the estimator reads). With ``algorithm.use_opd``, the
   distillation term -opd_kl_coef x (old - teacher log-prob) on each token, added to the
   estimator's advantages or alone (:mod:`megarl.algorithms.distillation`). Then, with
   ``algorithm.advantage_clip``, the advantages are clipped to [-c, c].
3. DAPO's overlong filtering: the truncated responses leave the loss (after the advantages, so
   that their scores still count in their group's baseline).
4. :func:`loss_weights`: the train/rollout mismatch correction (TIS, ICEPOP, decoupled PPO's
   behaviour weight or sequence-level importance sampling) per token, rejection sampling, and the
   mismatch metrics.

:func:`prepare_update` runs the four in order.
"""

from __future__ import annotations

import torch

from megarl.algorithms.advantages import ADVANTAGES, clip_advantages
from megarl.algorithms.advantages import compute_advantages as run_estimator
from megarl.algorithms.advantages import outcome_token_rewards
from megarl.algorithms.distillation import opd_advantages
from megarl.algorithms.kl import apply_kl_penalty, estimate_kl
from megarl.algorithms.mismatch import (
    decoupled_weights,
    icepop_weights,
    mismatch_metrics,
    rejection_mask,
    sequence_is_weights,
    tis_weights,
)
from megarl.algorithms.shaping import RunningMoments, clip_rewards, normalize_rewards, overlong_filter, overlong_penalty
from megarl.config import AlgorithmConfig
from megarl.trainer.batch import TrainBatch


def prepare_update(
    batch: TrainBatch, scores: torch.Tensor, algorithm: AlgorithmConfig, running: RunningMoments, kl_controller, *, max_response_length: int
) -> dict[str, float]:
    """Shape ``scores [B]``, fill the batch's advantages, returns and loss weights, and (with
    ``algorithm.filter_overlong``) take the truncated responses, and (with ``algorithm.rollout_rs``)
    the rejected tokens, out of ``batch.response_mask``.

    Args:
        batch: the step's samples, with the forward passes' token values.
        scores: ``[B]`` raw rewards.
        algorithm: the shaping, estimator, filtering and correction settings.
        running: the running moments of ``reward_norm: running`` (updated here).
        kl_controller: the reward KL penalty's coefficient controller (updated here).
        max_response_length: ``data.max_response_length``, the overlong penalty's limit.

    Returns:
        The metrics of every stage.
    """
    shaped, metrics = shape_scores(scores, batch, algorithm, running, max_response_length=max_response_length)
    metrics.update(compute_advantages(batch, shaped, algorithm, kl_controller))
    if algorithm.filter_overlong:
        batch.response_mask, counts = overlong_filter(batch.response_mask, batch.truncated)
        metrics.update({f"filter/{name}": value for name, value in counts.items()})
    metrics.update(loss_weights(batch, algorithm))
    return metrics


def shape_scores(
    scores: torch.Tensor, batch: TrainBatch, algorithm: AlgorithmConfig, running: RunningMoments, *, max_response_length: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores ``[B]`` after clipping, the overlong penalty and normalisation (in that order).

    Args:
        scores: ``[B]`` raw rewards.
        batch: the samples (response lengths, groups).
        algorithm: the clipping, overlong penalty and normalisation settings.
        running: the running moments of ``reward_norm: running`` (updated here).
        max_response_length: ``data.max_response_length``, the overlong penalty's limit.

    Returns:
        ``(scores, metrics)``.
    """
    metrics: dict[str, float] = {}
    shaped = clip_rewards(scores.float(), algorithm.reward_clip)
    if algorithm.overlong_penalty:
        penalty = overlong_penalty(
            batch.response_lengths,
            max_length=max_response_length,
            buffer_length=algorithm.overlong_buffer_length,
            factor=algorithm.overlong_penalty_factor,
        )
        shaped = shaped + penalty
        metrics["reward/overlong_penalty_mean"] = penalty.mean().item()
    shaped = normalize_rewards(shaped, algorithm.reward_norm, group_ids=batch.group_ids, running=running)
    return shaped, metrics


def compute_advantages(batch: TrainBatch, scores: torch.Tensor, algorithm: AlgorithmConfig, kl_controller) -> dict[str, float]:
    """Fill ``batch.token_values["advantages"]`` and ``["returns"]``.

    Args:
        batch: with ``old_log_probs`` and ``rollout_log_probs`` (and ``ref_log_probs`` with a KL
            penalty, ``values`` for gae, ``sum_pi_squared`` for the optimal token baseline,
            ``teacher_log_probs`` with on-policy distillation).
        scores: ``[B]`` shaped scores.
        algorithm: the estimator and the reward KL penalty's settings.
        kl_controller: the reward KL penalty's coefficient controller (updated here).

    Returns:
        Metrics: advantage statistics (after clipping; ``advantages/clip_fraction`` with
        ``algorithm.advantage_clip``), the penalty's KL and coefficient when it is on, and with
        on-policy distillation ``opd/reverse_kl`` and ``opd/teacher_log_prob`` (means over valid tokens).
    """
    mask = batch.response_mask
    token_rewards = outcome_token_rewards(scores, mask)
    metrics: dict[str, float] = {}
    if algorithm.use_kl_in_reward:
        values = batch.token_values
        kl = estimate_kl(algorithm.kl_estimator, values["old_log_probs"], values["ref_log_probs"], mask)
        token_rewards = apply_kl_penalty(token_rewards, kl, mask, kl_controller.value)
        # As verl: the mean over responses of each response's mean KL (not the token mean, which
        # would weigh long responses more).
        mean_kl = (torch.where(mask, kl, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)).mean().item()
        metrics.update({"kl/reward_kl": mean_kl, "kl/coefficient": kl_controller.value})
        kl_controller.update(mean_kl, batch.size)
    advantages, returns = run_estimator(
        algorithm.advantage_estimator,
        scores=token_rewards.sum(-1),
        token_rewards=token_rewards,
        values=batch.token_values.get("values"),
        response_mask=mask,
        group_ids=batch.group_ids,
        gamma=algorithm.gamma,
        lam=algorithm.lam,
        norm_by_std=algorithm.norm_adv_by_std,
        whiten=algorithm.whiten_advantages,
        reward_baselines=batch.reward_baselines,
        old_log_probs=batch.token_values.get("old_log_probs"),
        sum_pi_squared=batch.token_values.get("sum_pi_squared"),
        rollout_is_weights=_estimator_importance_weights(batch, algorithm),
    )
    if algorithm.use_opd:
        advantages, opd_metrics = opd_advantages(
            advantages, batch.token_values["old_log_probs"], batch.token_values["teacher_log_probs"], mask,
            kl_coef=algorithm.opd_kl_coef, task_reward=algorithm.opd_task_reward,
            group_ids=batch.group_ids if algorithm.opd_baseline == "leave_one_out" else None,
        )
        metrics.update({f"opd/{name}": value.item() for name, value in opd_metrics.items()})
    if algorithm.advantage_clip is not None:
        advantages, clip_fraction = clip_advantages(advantages, mask, algorithm.advantage_clip)
        metrics["advantages/clip_fraction"] = clip_fraction.item()
    batch.token_values["advantages"] = advantages.float()
    batch.token_values["returns"] = returns.float()
    valid = advantages[mask.bool()]
    if valid.numel():
        metrics.update(
            {
                "advantages/mean": valid.mean().item(),
                "advantages/std": valid.std().item() if valid.numel() > 1 else 0.0,
                "advantages/max": valid.max().item(),
                "advantages/min": valid.min().item(),
            }
        )
    return metrics


def _estimator_importance_weights(batch: TrainBatch, algorithm: AlgorithmConfig) -> torch.Tensor | None:
    """``rollout_is_weights [B, T]`` for an estimator that reads them: the train/rollout correction
    weights of :func:`loss_weights` on the current response mask, rejected tokens 0 (all 1 without
    a correction); None for the other estimators, which are spared computing them."""
    if not ADVANTAGES.takes(algorithm.advantage_estimator, "rollout_is_weights"):
        return None
    values = batch.token_values
    weights, _, _ = _corrections(values["old_log_probs"], values["rollout_log_probs"], batch.response_mask, algorithm)
    return weights


def loss_weights(batch: TrainBatch, algorithm: AlgorithmConfig) -> dict[str, float]:
    """Fill ``batch.token_values["loss_weights"]`` (1, or the TIS / ICEPOP / decoupled PPO /
    sequence-level importance weights), take the tokens that rejection sampling rejects out of
    ``batch.response_mask``, and measure how far the trainer's log-probs are from the engine's.
    Every rank computes this on the whole batch, so a sequence's weight does not depend on its
    micro-batch or rank.

    Returns:
        ``mismatch/*`` metrics (mean and max absolute log-prob difference, the rollout KL) and
        the correction's own.
    """
    mask = batch.response_mask
    old, rollout = batch.token_values["old_log_probs"], batch.token_values["rollout_log_probs"]
    metrics = {f"mismatch/{name}": value.item() for name, value in mismatch_metrics(old, rollout, mask).items()}
    weights, keep, correction_metrics = _corrections(old, rollout, mask, algorithm)
    metrics.update({f"mismatch/{name}": value.item() for name, value in correction_metrics.items()})
    if keep is not None:
        batch.response_mask = keep.to(mask.dtype)
    batch.token_values["loss_weights"] = weights.float()
    return metrics


def _corrections(
    old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, algorithm: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The configured train/rollout corrections of log-probs ``old`` and ``rollout`` on ``mask``,
    all ``[B, T]``: ``(weights, keep, metrics)``, the weights 0 where rejection sampling rejects
    (``keep`` false; None without rejection sampling)."""
    metrics: dict[str, torch.Tensor] = {}
    weights, keep = torch.where(mask, 1.0, 0.0), None
    if algorithm.tis:
        weights, tis_metrics = tis_weights(old, rollout, mask, low=algorithm.tis_threshold_low, high=algorithm.tis_threshold_high)
        metrics.update(tis_metrics)
    if algorithm.icepop:
        icepop, icepop_metrics = icepop_weights(old, rollout, mask, low=algorithm.icepop_low, high=algorithm.icepop_high)
        weights = weights * icepop
        metrics.update(icepop_metrics)
    if algorithm.use_decoupled_loss:
        weights, decoupled_metrics = decoupled_weights(old, rollout, mask, cap=algorithm.behav_imp_weight_cap)
        metrics.update(decoupled_metrics)
    if algorithm.rollout_is is not None:
        weights, is_metrics = sequence_is_weights(old, rollout, mask, level=algorithm.rollout_is, threshold=algorithm.rollout_is_threshold)
        metrics.update(is_metrics)
    if algorithm.rollout_rs is not None:
        keep, rs_metrics = rejection_mask(
            old, rollout, mask, criterion=algorithm.rollout_rs, upper=algorithm.rollout_rs_threshold, lower=algorithm.rollout_rs_threshold_lower
        )
        weights = torch.where(keep, weights, 0.0)
        metrics.update(rs_metrics)
    return weights, keep, metrics
