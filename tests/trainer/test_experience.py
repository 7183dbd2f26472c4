"""From scores to advantages and loss weights, on a small batch, against the algorithms directly."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.algorithms.advantages import compute_advantages as estimator
from megarl.algorithms.advantages import outcome_token_rewards
from megarl.algorithms.kl import FixedKLController
from megarl.algorithms.shaping import RunningMoments
from megarl.config import load_config
from megarl.trainer.batch import ScoredSample, TrainBatch
from megarl.trainer.experience import compute_advantages, loss_weights, prepare_update, shape_scores

pytestmark = pytest.mark.cpu


def make_batch() -> TrainBatch:
    generator = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    responses = [[6] * length for length in (1, 2, 3, 4, 4, 3, 2, 1)]
    log_probs = [(-torch.rand(len(response), generator=generator)).tolist() for response in responses]
    batch = TrainBatch.from_samples(
        prompts, responses, log_probs, group_ids=[0] * 4 + [1] * 4, truncated=[False] * 7 + [True], pad_token_id=0, pad_multiple=1
    )
    noise = 0.01 * torch.randn(batch.tokens.shape, generator=generator)
    batch.token_values["old_log_probs"] = torch.where(batch.response_mask, batch.token_values["rollout_log_probs"] + noise, 0.0)
    batch.token_values["ref_log_probs"] = torch.where(batch.response_mask, batch.token_values["rollout_log_probs"] - 0.1, 0.0)
    return batch


SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])


def test_grpo_advantages_are_the_estimator_on_the_scores():
    config = load_config(None)
    batch = make_batch()
    metrics = compute_advantages(batch, SCORES, config.algorithm, FixedKLController(0.0))
    expected, _ = estimator("grpo", scores=SCORES, response_mask=batch.response_mask, group_ids=batch.group_ids, norm_by_std=True)
    assert torch.equal(batch.token_values["advantages"], expected.float())
    assert math.isclose(metrics["advantages/max"], expected[batch.response_mask].max().item(), rel_tol=1e-6)


def test_whitening_off_reaches_the_estimator_and_the_clip_comes_last():
    # reinforce_pp without whitening: A = G = the score on every token (gamma 1); clipped to 0.5.
    config = load_config(None, ["algorithm.advantage_estimator=reinforce_pp", "algorithm.whiten_advantages=false", "algorithm.advantage_clip=0.5"])
    batch = make_batch()
    metrics = compute_advantages(batch, SCORES, config.algorithm, FixedKLController(0.0))
    mask = batch.response_mask
    expected = torch.where(mask, 0.5 * SCORES[:, None], 0.0)
    assert torch.equal(batch.token_values["advantages"], expected)
    assert torch.equal(batch.token_values["returns"], torch.where(mask, SCORES[:, None], 0.0))  # returns are not clipped
    # Responses 0, 3 and 7 (1, 4 and 1 tokens) score 1: 6 of the 20 valid tokens lay above the clip.
    assert metrics["advantages/clip_fraction"] == pytest.approx(6 / 20)
    assert metrics["advantages/max"] == 0.5
    whitened = make_batch()
    default = load_config(None, ["algorithm.advantage_estimator=reinforce_pp"]).algorithm
    assert "advantages/clip_fraction" not in compute_advantages(whitened, SCORES, default, FixedKLController(0.0))
    assert not torch.equal(whitened.token_values["advantages"], torch.where(mask, SCORES[:, None], 0.0))


def test_kl_penalty_in_the_reward_lowers_the_scores_and_reaches_the_controller():
    config = load_config(None, ["algorithm.use_kl_in_reward=true", "algorithm.advantage_estimator=reinforce_pp", "algorithm.kl_coef=0.5"])
    batch = make_batch()
    controller = FixedKLController(0.5)
    metrics = compute_advantages(batch, SCORES, config.algorithm, controller)
    # k1 = old - ref = 0.1 + noise per token, so the penalty is about 0.05 per token.
    assert 0.09 < metrics["kl/reward_kl"] < 0.11
    without = make_batch()
    compute_advantages(without, SCORES, load_config(None, ["algorithm.advantage_estimator=reinforce_pp"]).algorithm, FixedKLController(0.0))
    assert (batch.token_values["returns"] < without.token_values["returns"])[batch.response_mask].all()


def test_the_kl_controller_sees_the_mean_of_per_response_means_as_verl():
    class Recorder(FixedKLController):
        def update(self, current_kl, n_steps):
            self.seen = (current_kl, n_steps)

    config = load_config(None, ["algorithm.use_kl_in_reward=true", "algorithm.advantage_estimator=reinforce_pp", "algorithm.kl_coef=0.5"])
    batch = make_batch()
    values, mask = batch.token_values, batch.response_mask
    # k1 = old - ref: 1 on the first response (1 token), 0 on the others: per-response means
    # average to 1/8, the token mean would be 1/20.
    values["old_log_probs"] = values["ref_log_probs"].clone()
    values["old_log_probs"][0] += 1.0
    controller = Recorder(0.5)
    metrics = compute_advantages(batch, SCORES, config.algorithm, controller)
    assert mask.sum() == 20 and controller.seen == (pytest.approx(1 / 8), 8) and metrics["kl/reward_kl"] == pytest.approx(1 / 8)


def test_shaping_clips_then_penalises_overlong_then_normalises():
    config = load_config(
        None,
        ["algorithm.reward_clip=0.5", "algorithm.overlong_penalty=true", "algorithm.overlong_buffer_length=2", "algorithm.reward_norm=batch"],
    )
    batch = make_batch()
    shaped, metrics = shape_scores(SCORES * 3, batch, config.algorithm, RunningMoments(), max_response_length=4)
    # Clipped to 0.5, then lengths 3 and 4 lose 0.5 and 1.0 (buffer of 2 before the limit of 4).
    raw = torch.tensor([0.5, 0.0, -0.5, -0.5, -1.0, -0.5, 0.0, 0.5])
    assert torch.allclose(shaped, (raw - raw.mean()) / (raw.std() + 1e-6), atol=1e-6)
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(-3.0 / 8)


def test_loss_weights_are_one_without_correction_and_truncated_with_tis():
    batch = make_batch()
    metrics = loss_weights(batch, load_config(None).algorithm)
    assert torch.equal(batch.token_values["loss_weights"], batch.response_mask.float())
    assert metrics["mismatch/logprob_diff_abs_max"] <= 0.05
    batch.token_values["old_log_probs"] = torch.where(batch.response_mask, batch.token_values["rollout_log_probs"] + 1.0, 0.0)
    metrics = loss_weights(batch, load_config(None, ["algorithm.tis=true", "algorithm.tis_threshold_high=2.0"]).algorithm)
    weights = batch.token_values["loss_weights"][batch.response_mask]
    assert torch.allclose(weights, torch.full_like(weights, 2.0))
    assert metrics["mismatch/tis_clipped_fraction_high"] == 1.0


def test_decoupled_loss_weights_by_prox_over_behaviour_and_masks_above_the_cap():
    batch = make_batch()
    mask = batch.response_mask
    rollout = batch.token_values["rollout_log_probs"]
    # Rows 0-3 were sampled by a policy that gave their tokens e^-0.5 of the proximal probability
    # (w = e^0.5 < 2), rows 4-7 e^-1 (w = e > 2: capped).
    shift = torch.tensor([0.5] * 4 + [1.0] * 4)[:, None]
    batch.token_values["old_log_probs"] = torch.where(mask, rollout + shift, 0.0)
    algorithm = load_config(None, ["algorithm.use_decoupled_loss=true", "algorithm.behav_imp_weight_cap=2.0"]).algorithm
    metrics = loss_weights(batch, algorithm)
    weights = batch.token_values["loss_weights"]
    assert torch.allclose(weights[:4][mask[:4]], torch.full_like(weights[:4][mask[:4]], math.exp(0.5)))
    assert not weights[4:].any() and not weights[~mask].any()
    tokens = mask.sum().item()
    assert metrics["mismatch/behav_imp_weight_capped_fraction"] == pytest.approx(mask[4:].sum().item() / tokens)
    assert metrics["mismatch/behav_imp_weight_mean"] == pytest.approx(math.exp(0.5) * mask[:4].sum().item() / tokens, rel=1e-6)


def test_sequence_is_weights_each_sequence_and_rejection_sampling_leaves_the_response_mask():
    batch = make_batch()
    mask = batch.response_mask.clone()
    rollout = batch.token_values["rollout_log_probs"]
    # Every token of row i is off by 0.1 * (i - 3): rows 0-2 lower, 4-7 higher on the trainer's side.
    shift = 0.1 * (torch.arange(8.0) - 3)[:, None]
    batch.token_values["old_log_probs"] = torch.where(mask, rollout + shift, 0.0)
    options = ["algorithm.rollout_is=geometric", "algorithm.rollout_is_threshold=1.3", "algorithm.rollout_rs=token_k2"]
    metrics = loss_weights(batch, load_config(None, options + ["algorithm.rollout_rs_threshold=0.1"]).algorithm)
    # Geometric mean of a constant shift: exp(0.1 (i - 3)), truncated at 1.3 (rows 6, 7);
    # no token has k2 = shift^2 / 2 > 0.1.
    expected = torch.where(mask, torch.exp(shift).clamp(max=1.3), 0.0)
    assert torch.allclose(batch.token_values["loss_weights"], expected)
    assert torch.equal(batch.response_mask, mask)
    assert metrics["mismatch/rollout_is_ratio_fraction_high"] == pytest.approx(2 / 8)
    assert metrics["mismatch/rollout_rs_masked_fraction"] == 0.0
    # k2 = 0.5 (0.1 (i - 3))^2 > 0.03 for rows 0, 6 and 7 (|i - 3| >= 3): they leave the loss and the mask.
    batch.response_mask = mask.clone()
    metrics = loss_weights(batch, load_config(None, options + ["algorithm.rollout_rs_threshold=0.03"]).algorithm)
    rejected = torch.tensor([True, False, False, False, False, False, True, True])
    assert torch.equal(batch.response_mask, mask & ~rejected[:, None])
    assert not batch.token_values["loss_weights"][rejected].any()
    assert torch.allclose(batch.token_values["loss_weights"][~rejected], expected[~rejected])
    assert metrics["mismatch/rollout_rs_seq_masked_fraction"] == pytest.approx(3 / 8)
    assert metrics["mismatch/rollout_rs_masked_fraction"] == pytest.approx(mask[rejected].sum().item() / mask.sum().item())


def test_the_optimal_token_baseline_reads_the_old_pass_and_the_loss_weights_before_rejection():
    """It gets old_log_probs and sum_pi_squared from the batch and, as rollout_is_weights, the loss
    weights stage 4 computes (rejected tokens 0), while the response mask stays whole until then."""
    options = [
        "algorithm.advantage_estimator=optimal_token_baseline", "algorithm.rollout_is=geometric", "algorithm.rollout_is_threshold=1.3",
        "algorithm.rollout_rs=token_k2", "algorithm.rollout_rs_threshold=0.03",
    ]
    algorithm = load_config(None, options).algorithm
    batch = make_batch()
    mask = batch.response_mask.clone()
    shift = 0.1 * (torch.arange(8.0) - 3)[:, None]
    batch.token_values["old_log_probs"] = torch.where(mask, batch.token_values["rollout_log_probs"] + shift, 0.0)
    batch.token_values["sum_pi_squared"] = torch.where(mask, torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)), 0.0)
    compute_advantages(batch, SCORES, algorithm, FixedKLController(0.0))
    assert torch.equal(batch.response_mask, mask)
    loss_weights(batch, algorithm)
    rejected = torch.tensor([True, False, False, False, False, False, True, True])
    assert not batch.token_values["loss_weights"][rejected].any() and batch.token_values["loss_weights"][~rejected & mask.any(-1)].any()
    inputs = dict(
        token_rewards=outcome_token_rewards(SCORES, mask), response_mask=mask, group_ids=batch.group_ids,
        old_log_probs=batch.token_values["old_log_probs"], sum_pi_squared=batch.token_values["sum_pi_squared"],
    )
    weighted, _ = estimator("optimal_token_baseline", **inputs, rollout_is_weights=batch.token_values["loss_weights"])
    unweighted, _ = estimator("optimal_token_baseline", **inputs)
    assert torch.equal(batch.token_values["advantages"], weighted.float())
    assert not torch.allclose(weighted, unweighted)


def test_overlong_filtering_keeps_the_truncated_score_in_the_group_baseline():
    # Row 7 is truncated with score 1: it leaves the loss, but its group's other advantages are the
    # ones computed with its score.
    filtered, unfiltered = make_batch(), make_batch()
    config = load_config(None, ["algorithm.filter_overlong=true"])
    length = config.data.max_response_length
    metrics = prepare_update(filtered, SCORES, config.algorithm, RunningMoments(), FixedKLController(0.0), max_response_length=length)
    prepare_update(unfiltered, SCORES, load_config(None).algorithm, RunningMoments(), FixedKLController(0.0), max_response_length=length)
    assert metrics["filter/overlong_filtered"] == 1
    assert not filtered.response_mask[7].any() and filtered.response_mask[:7].equal(unfiltered.response_mask[:7])
    kept = filtered.response_mask
    assert torch.equal(filtered.token_values["advantages"][kept], unfiltered.token_values["advantages"][kept])
    assert not filtered.token_values["loss_weights"][7].any()


@pytest.mark.parametrize("task_reward", [True, False])
def test_on_policy_distillation_shapes_the_estimators_advantages_with_the_packed_teacher_log_probs(task_reward):
    samples = [
        ScoredSample(prompt_ids=[1, 2, 3], response_ids=[6] * length, rollout_log_probs=[-0.5] * length, finish_reason="stop",
                     group=index // 2, score=float(index % 2), teacher_log_probs=[-0.1 * (j + 1) for j in range(length)])
        for index, length in enumerate((1, 2, 3, 2))
    ]
    batch = TrainBatch.from_scored(samples, pad_token_id=0, pad_multiple=4)
    teacher = batch.token_values["teacher_log_probs"]
    # Label space: response token j of a sample with a 3-token prompt sits in column 2 + j.
    assert teacher[2, 2:5].tolist() == pytest.approx([-0.1, -0.2, -0.3]) and not teacher[~batch.response_mask].any()
    batch.token_values["old_log_probs"] = torch.where(batch.response_mask, -0.4, 0.0)
    scores = torch.tensor([sample.score for sample in samples])
    plain = load_config(None).algorithm
    compute_advantages(batch, scores, plain, FixedKLController(0.0))
    task = batch.token_values["advantages"].clone()
    distilled = load_config(None, ["algorithm.use_opd=true", "algorithm.opd_kl_coef=0.5", f"algorithm.opd_task_reward={str(task_reward).lower()}"]).algorithm
    metrics = compute_advantages(batch, scores, distilled, FixedKLController(0.0))
    expected = torch.where(batch.response_mask, (task if task_reward else 0.0) - 0.5 * (-0.4 - teacher), 0.0)
    torch.testing.assert_close(batch.token_values["advantages"], expected)
    valid = batch.response_mask
    assert metrics["opd/reverse_kl"] == pytest.approx((-0.4 - teacher[valid]).mean().item())
    assert metrics["opd/teacher_log_prob"] == pytest.approx(teacher[valid].mean().item())
