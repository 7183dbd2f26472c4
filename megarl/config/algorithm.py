"""The ``algorithm`` section: advantages, policy loss, KL, corrections and filters.

The advantage estimator and the policy loss are names of functions registered in
:mod:`megarl.algorithms` (torch code): the config, which imports without torch, holds them as plain
strings, and :mod:`megarl.preflight` checks them against the registries once every cheap check has
passed, so that a new estimator or loss is one decorated function and no edit here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Literal, Optional

from megarl.config.base import Range, Section

KLEstimator = Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]
"""The KL estimators :mod:`megarl.algorithms.kl` registers; with ``+``, the straight-through variant
(the estimator's value, k2's gradient; verl: ``k1+``, ``k3+`` / ``low_var_kl+``, ``abs+``)."""

RolloutISLevel = Literal["sequence", "geometric"]
"""The sequence-level importance sampling weights of :mod:`megarl.algorithms.mismatch`."""
RolloutRSCriterion = Literal[
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
]  # fmt: skip
"""The rejection sampling criteria of :mod:`megarl.algorithms.mismatch` (verl's names)."""

DUAL_CLIP_FREE = {"cispo": "CISPO has no dual clip", "clip_cov": "Clip-Cov has no dual clip", "kl_cov": "KL-Cov has no clip"}
"""The policy losses that refuse ``clip_ratio_c``, and why."""


@dataclasses.dataclass(kw_only=True, slots=True)
class AlgorithmConfig(Section):
    """Advantages, the policy loss, KL, train/rollout mismatch corrections, reward shaping and filters."""

    advantage_estimator: str = "grpo"
    """How advantages are computed: a name in :data:`megarl.algorithms.advantages.ADVANTAGES`,
    built in ``grpo``, ``gae``, ``rloo``, ``reinforce_pp``, ``reinforce_pp_baseline``, ``opo``
    (verl: opo), ``gpg`` (verl: gpg), ``grpo_passk`` (verl: grpo_passk), ``remax`` (verl: remax;
    each round also generates one greedy answer per prompt, scored, as the baseline of the prompt's
    samples; synchronous single-turn rollouts, reward_norm none) and ``optimal_token_baseline``
    (verl: optimal_token_baseline; the old-log-prob pass then also computes each token's sum of
    squared probabilities over the vocabulary, verl's actor.calculate_sum_pi_squared, which this
    turns on by itself, from the logits or the fused path's hidden states alike; with a
    train/rollout correction its weights are the rollout IS weights); gae trains a critic. A new one is a function decorated with ``@register_advantage(name)`` in
    ``megarl/algorithms/advantages.py``; the name is checked against the registry before the run
    starts (:mod:`megarl.preflight`) (verl: algorithm.adv_estimator, slime: --advantage-estimator)."""
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    """Discount factor per token, in [0, 1] (gae, reinforce_pp) (verl: algorithm.gamma)."""
    lam: Annotated[float, Range(ge=0, le=1)] = 1.0
    """GAE lambda, in [0, 1] (verl: algorithm.lam)."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std; false is Dr. GRPO (verl: algorithm.norm_adv_by_std_in_grpo)."""
    whiten_advantages: bool = True
    """The batch normalisation three estimators end with, over the batch's valid tokens: gae and
    reinforce_pp whiten, A <- (A - mean) / (std + eps), reinforce_pp_baseline divides by the std;
    false leaves it out (gae's raw advantages, reinforce_pp's discounted returns,
    reinforce_pp_baseline's group-centred scores). The other estimators have no batch
    normalisation (grpo's group std is norm_adv_by_std), and the run refuses false with them. Maths
    in :mod:`megarl.algorithms.advantages` (ROLL: whiten_advantages; verl's GAE always whitens)."""
    advantage_clip: Annotated[Optional[float], Range(gt=0)] = None
    """Clip every advantage to [-advantage_clip, advantage_clip], after the estimator and the
    distillation term; the returns (the critic's targets) are not clipped; null: off. Metric
    advantages/clip_fraction (LightRFT: --advantage_clip, ROLL: advantage_clip; 0 is off there)."""
    policy_loss: str = "ppo"
    """Policy objective: a name in :data:`megarl.algorithms.policy_losses.POLICY_LOSSES`, built in
    ``ppo`` (token-level PPO clip), ``gspo`` (sequence-level ratio), ``cispo`` (clipped importance
    weight, gradient through every token), ``gpg`` (-A log pi, no ratio), ``sapo`` (soft gate,
    tau_pos / tau_neg), ``gmpo`` (geometric-mean ratio, verl: geo_mean), ``dppo_tv`` / ``dppo_kl``
    (DPPO's probability trust region: clip_ratio_low / high are its TV or binary-KL bounds,
    clip_ratio_c its importance-weight truncation), ``clip_cov`` (PPO clip, the loss of a random
    few high-covariance tokens set to 0: clip_cov_ratio, clip_cov_lb, clip_cov_ub) and ``kl_cov``
    (no clip, a |log ratio| penalty on the top high-covariance tokens: kl_cov_ratio, ppo_kl_coef);
    those two select per micro-batch, as verl, so their loss depends on how a mini-batch is split.
    verl aggregates sapo, gspo and geo_mean per sequence: use loss_agg_mode seq-mean-token-mean to
    match it. Maths in :mod:`megarl.algorithms.policy_losses` and
    :mod:`megarl.algorithms.covariance_losses`. A new one is a function decorated with
    ``@register_policy_loss(name)`` in ``megarl/algorithms/policy_losses.py``; the name is checked
    against the registry before the run starts (:mod:`megarl.preflight`) (verl:
    actor.policy_loss.loss_mode)."""
    tau_pos: Annotated[float, Range(gt=0)] = 1.0
    """SAPO: temperature of the soft gate where the advantage is positive (verl: actor.tau_pos)."""
    tau_neg: Annotated[float, Range(gt=0)] = 1.05
    """SAPO: temperature of the soft gate where the advantage is <= 0; above tau_pos, negative
    updates fade faster (verl: actor.tau_neg)."""
    clip_cov_ratio: Annotated[float, Range(gt=0, le=1)] = 0.0002
    """Clip-Cov: the share of a micro-batch's valid tokens whose loss may be set to 0 (at least
    one), drawn among the candidates (verl: actor.policy_loss.clip_cov_ratio)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: a candidate's covariance (A - mean A)(log pi - mean log pi) lies above this
    (verl: actor.policy_loss.clip_cov_lb)."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: ... and below this; > clip_cov_lb (verl: actor.policy_loss.clip_cov_ub)."""
    kl_cov_ratio: Annotated[float, Range(gt=0, le=1)] = 0.0002
    """KL-Cov: the share of a micro-batch's valid tokens, those of largest covariance, that take
    the |log ratio| penalty (at least one) (verl: actor.policy_loss.kl_cov_ratio)."""
    ppo_kl_coef: Annotated[float, Range(ge=0)] = 0.1
    """KL-Cov: the penalty's coefficient (verl: actor.policy_loss.ppo_kl_coef)."""
    clip_ratio_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """PPO clip below 1: the ratio is kept >= 1 - clip_ratio_low (verl: actor.clip_ratio_low, slime:
    --eps-clip)."""
    clip_ratio_high: Annotated[float, Range(ge=0)] = 0.2
    """PPO clip above 1: the ratio is kept <= 1 + clip_ratio_high; above clip_ratio_low it is DAPO's
    clip-higher (verl: actor.clip_ratio_high, slime: --eps-clip-high)."""
    clip_ratio_c: Annotated[Optional[float], Range(gt=1)] = None
    """Dual-clip bound (> 1, e.g. 3.0) for negative advantages; null disables it. Off by default,
    where verl's is on at 3.0: set 3.0 to match verl (verl: actor.clip_ratio_c, slime: --eps-clip-c)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"] = "token-mean"
    """How per-token losses become one number (verl: actor.loss_agg_mode). ``token-sum``: the plain
    sum over the mini-batch's valid tokens, no normaliser (its scale grows with batch and length).
    Definitions in :mod:`megarl.algorithms.aggregation`."""
    entropy_coeff: Annotated[float, Range(ge=0)] = 0.0
    """Entropy bonus coefficient (verl: actor.entropy_coeff, slime: --entropy-coef)."""
    use_kl_in_reward: bool = False
    """Subtract a KL-to-reference penalty from the token rewards (verl: algorithm.use_kl_in_reward)."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator of the reward penalty (verl: algorithm.kl_penalty); a ``+`` variant has the same
    value as its base here (no gradient flows through the reward)."""
    kl_ctrl: Literal["fixed", "adaptive"] = "fixed"
    """Controller of the reward penalty's coefficient (verl: algorithm.kl_ctrl.type)."""
    kl_coef: Annotated[float, Range(ge=0)] = 0.001
    """Reward penalty coefficient; the initial one when adaptive (verl: algorithm.kl_ctrl.kl_coef)."""
    kl_target: Annotated[float, Range(gt=0)] = 0.1
    """Adaptive controller: target KL per token (verl: algorithm.kl_ctrl.target_kl)."""
    kl_horizon: Annotated[int, Range(ge=1)] = 10000
    """Adaptive controller: horizon, samples (verl: algorithm.kl_ctrl.horizon)."""
    use_kl_loss: bool = False
    """Add KL to the reference policy as a loss term (verl: actor.use_kl_loss, slime: --use-kl-loss)."""
    kl_loss_coef: Annotated[float, Range(ge=0)] = 0.001
    """Coefficient of the KL loss term (verl: actor.kl_loss_coef, slime: --kl-loss-coef)."""
    kl_loss_estimator: KLEstimator = "k3"
    """KL estimator of the loss term; k3 is verl's low_var_kl. ``k1+``, ``k3+``, ``abs+``: the value
    of k1, k3, abs with the gradient of k2, d = log pi - log pi_ref (verl's k1+, k3+ /
    low_var_kl+) (verl: actor.kl_loss_type, slime: --kl-loss-type)."""
    tis: bool = False
    """Truncated importance sampling: weight each token by its train/rollout probability ratio,
    clipped to [tis_threshold_low, tis_threshold_high] (slime: --use-tis)."""
    tis_threshold_low: Annotated[float, Range(ge=0)] = 0.0
    """TIS: lower bound of the weight (slime: --tis-clip-low)."""
    tis_threshold_high: float = 2.0
    """TIS: upper bound of the weight (slime: --tis-clip)."""
    icepop: bool = False
    """ICEPOP: mask tokens whose train/rollout probability ratio leaves [icepop_low, icepop_high]
    (OpenRLHF: --use_icepop)."""
    icepop_low: Annotated[float, Range(gt=0)] = 0.5
    """ICEPOP: lower ratio bound."""
    icepop_high: float = 2.0
    """ICEPOP: upper ratio bound."""
    use_decoupled_loss: bool = False
    """Decoupled PPO for samples the engine drew from an older policy (asynchronous RL): the clip
    stays on pi_theta / pi_prox, pi_prox being the trainer's log-probs before the update
    (old_log_probs), and each token's loss is multiplied by the behaviour weight
    pi_prox / pi_behav (pi_behav: the engine's log-probs), no gradient through it, 0 above
    behav_imp_weight_cap. Metrics mismatch/behav_imp_weight_mean and
    mismatch/behav_imp_weight_capped_fraction. TIS and ICEPOP are the same weight truncated
    otherwise: pick one of the three; gspo and gmpo are refused (their ratio is per sequence). Maths in
    :mod:`megarl.algorithms.mismatch` (AReaL: actor.use_decoupled_loss)."""
    behav_imp_weight_cap: Annotated[Optional[float], Range(gt=1)] = 5.0
    """Decoupled PPO: tokens whose behaviour weight pi_prox / pi_behav exceeds this leave the
    gradient (weight 0; they still count in the aggregation normaliser); > 1, null for no cap
    (AReaL: actor.behav_imp_weight_cap, null by default there; its example configs use 5)."""
    rollout_is: Optional[RolloutISLevel] = None
    """Sequence-level truncated importance sampling of the train/rollout mismatch: each token of a
    sequence is weighted by min(rho, rollout_is_threshold), no gradient through it, with rho the
    product (``sequence``) or geometric mean (``geometric``) of its tokens' pi_old / pi_rollout;
    null: off. Metrics mismatch/rollout_is_*. Another truncation of the same ratio as tis, icepop
    and use_decoupled_loss: pick one of the four. verl's ``token`` level is algorithm.tis with
    tis_threshold_low 0. Maths in :mod:`megarl.algorithms.mismatch` (verl:
    algorithm.rollout_correction.rollout_is)."""
    rollout_is_threshold: Annotated[float, Range(gt=0)] = 2.0
    """Sequence-level importance sampling: the weight's upper truncation (verl:
    algorithm.rollout_correction.rollout_is_threshold)."""
    rollout_rs: Optional[RolloutRSCriterion] = None
    """Rejection sampling: tokens (``token_k*``) or whole sequences (``seq_sum_k*``, ``seq_mean_k*``,
    ``seq_max_k*``) whose train/rollout divergence leaves the threshold(s) leave response_mask (no
    gradient, no place in the normalisers); k1 = -log w, k2 = (log w)^2 / 2, k3 = w - 1 - log w of
    the token ratio w = pi_old / pi_rollout, summed, averaged or maxed over the sequence; null:
    off. Combines with any of the weights above. Metrics mismatch/rollout_rs_*. Maths in
    :mod:`megarl.algorithms.mismatch` (verl: algorithm.rollout_correction.rollout_rs, one criterion
    here where verl takes a comma-separated list)."""
    rollout_rs_threshold: Annotated[Optional[float], Range(gt=0)] = None
    """Rejection sampling's upper bound, needed with rollout_rs: k2 / k3 statistics above it are
    rejected; for k1, the rollout/train probability ratio exp(k1) (its product for seq_sum, geometric
    mean for seq_mean) above it, e.g. 2.0 (verl: algorithm.rollout_correction.rollout_rs_threshold,
    the upper part of its "lower_upper" string for k1)."""
    rollout_rs_threshold_lower: Annotated[Optional[float], Range(gt=0)] = None
    """k1 rejection sampling only: exp(k1) below it is rejected; null is 1 / rollout_rs_threshold
    (verl: the lower part of algorithm.rollout_correction.rollout_rs_threshold's "lower_upper")."""
    reward_clip: Annotated[Optional[float], Range(gt=0)] = None
    """Clip scores to [-reward_clip, reward_clip]; null disables it (OpenRLHF: --reward_clip)."""
    reward_norm: Literal["none", "batch", "group", "running"] = "none"
    """Score normalisation before the advantage estimator: over the batch, within each group, or by
    running moments (OpenRLHF: --reward_running_norm)."""
    overlong_penalty: bool = False
    """DAPO soft overlong penalty on responses near data.max_response_length."""
    overlong_buffer_length: Annotated[int, Range(ge=1)] = 4
    """Tokens before the length limit over which the penalty ramps from 0 to overlong_penalty_factor
    (verl: reward_model.overlong_buffer.len)."""
    overlong_penalty_factor: Annotated[float, Range(ge=0)] = 1.0
    """Penalty at the length limit (verl: reward_model.overlong_buffer.penalty_factor)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose scores are all equal (no signal) and roll out again
    until the train batch is full (OpenRLHF: --dynamic_filtering, slime: --dynamic-sampling-filter-path)."""
    dynamic_sampling_mean_range: Optional[tuple[float, float]] = None
    """With dynamic sampling, also drop groups whose mean score lies outside [low, high]; null keeps
    them (OpenRLHF: --dynamic_filtering_reward_range)."""
    max_num_gen_batches: Annotated[int, Range(ge=1)] = 4
    """With dynamic sampling a step generates at most this many times the prompts a full train
    batch needs; if the kept groups still fall short, the batch is topped up with groups the filter
    dropped (verl: algorithm.filter_groups.max_num_gen_batches, which stops the run instead)."""
    filter_overlong: bool = False
    """Mask out of the loss the responses cut at the length limit (DAPO overlong filtering)."""
    use_opd: bool = False
    """On-policy distillation: a teacher (the ``teacher`` section) scores every trained response
    token with its log-prob given the prompt and the tokens before it, and each valid token's
    advantage gets -opd_kl_coef x (log pi_old - log pi_teacher), the sampled token's reverse KL to
    the teacher; maths in :mod:`megarl.algorithms.distillation`. Needs rollout.temperature 1 (the
    teacher's log-probs are its raw log-softmax, no temperature) (slime: --use-opd)."""
    opd_type: Literal["sglang", "megatron"] = "sglang"
    """On-policy distillation: where the teacher runs. ``sglang``: in engines of its own, of
    ``rollout.engine``'s kind (SGLang on GPUs, the embedded ``hf`` engine on CPU), launched on
    ``teacher.path`` on GPUs after the training ranks' and the rollout engines' (or given by
    ``teacher.engine_urls``), asked for the prompt log-probs of every trained sample before the
    batch is packed. ``megatron``: a second Megatron model built from ``teacher.path`` under the
    training layout, forward only (no optimizer, no gradients), its weights resident on the
    training devices beside the policy's; its log-probs come after the old log-probs each step
    (:mod:`megarl.trainer.teacher`) (slime: --opd-type)."""
    opd_kl_coef: Annotated[float, Range(ge=0)] = 1.0
    """On-policy distillation: the weight of the reverse-KL term in the advantage (slime: --opd-kl-coef)."""
    opd_task_reward: bool = True
    """On-policy distillation: true adds the distillation term to the estimator's advantages (as
    slime); false makes it the whole advantage, the task reward still scored and logged (pure
    distillation, as Thinking Machines' on-policy distillation)."""
    opd_baseline: Literal["none", "leave_one_out"] = "none"
    """On-policy distillation: ``leave_one_out`` centres each token's reverse-KL term on the mean of
    the same position's terms in the other responses to its prompt, a baseline that lowers the
    gradient's variance without biasing it; ``none`` is slime's term as it is. Maths in
    :mod:`megarl.algorithms.distillation` (slime, verl: no such option)."""
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """MoE routing replay (verl: actor.router_replay.mode; slime: --use-rollout-routing-replay).
    ``r3``: the engines return the experts they routed every token to, and the trainer's
    old-log-prob, reference and update passes route the same way (megatron-core's
    ``RouterReplay``), removing the routing part of the train/rollout mismatch. ``r2``: the update
    replays the routing of the trainer's own old-log-prob pass. ``none``: each pass routes anew.
    Needs an MoE model."""

    @property
    def teacher_in_engines(self) -> bool:
        """Whether on-policy distillation asks a teacher in engines of its own (``opd_type`` sglang)."""
        return self.use_opd and self.opd_type == "sglang"

    @property
    def teacher_in_megatron(self) -> bool:
        """Whether on-policy distillation's teacher is a Megatron model of the trainer (``opd_type`` megatron)."""
        return self.use_opd and self.opd_type == "megatron"

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if self.clip_ratio_c is not None and self.policy_loss in DUAL_CLIP_FREE:
            yield "clip_ratio_c", (
                f"({self.clip_ratio_c}) must be null with algorithm.policy_loss = {self.policy_loss} "
                f"({DUAL_CLIP_FREE[self.policy_loss]})"
            )
        if self.clip_cov_lb >= self.clip_cov_ub:
            yield "clip_cov_lb", f"({self.clip_cov_lb}) must be < clip_cov_ub ({self.clip_cov_ub}): no covariance would lie between them"
        if self.tis_threshold_low >= self.tis_threshold_high:
            yield "tis_threshold_low", f"({self.tis_threshold_low}) must be < tis_threshold_high ({self.tis_threshold_high})"
        if self.icepop_low >= self.icepop_high:
            yield "icepop_low", f"({self.icepop_low}) must be < icepop_high ({self.icepop_high})"
        if self.tis and self.icepop:
            yield "icepop", (
                "and algorithm.tis are both true: each weights a token by the importance ratio, so together they apply it twice; pick one"
            )
        if self.use_decoupled_loss:
            for correction in ("tis", "icepop"):
                if getattr(self, correction):
                    yield "use_decoupled_loss", (
                        f"and algorithm.{correction} are both true: each weights a token by pi_old / pi_rollout "
                        f"(decoupled PPO's behaviour weight, {correction.upper()} truncates it otherwise), "
                        "so together they apply it twice; pick one"
                    )
            if self.policy_loss in ("gspo", "gmpo"):
                yield "use_decoupled_loss", (
                    f"is not available with algorithm.policy_loss = {self.policy_loss}: the behaviour weight is per token and "
                    f"{self.policy_loss.upper()}'s ratio per sequence; use ppo or cispo"
                )
        if self.rollout_is is not None:
            for correction in ("tis", "icepop", "use_decoupled_loss"):
                if getattr(self, correction):
                    yield "rollout_is", (
                        f"({self.rollout_is}) and algorithm.{correction} are both set: each weights a token by pi_old / pi_rollout "
                        "(one per sequence, one per token), so together they apply it twice; pick one"
                    )
        if self.rollout_rs is not None:
            if self.rollout_rs_threshold is None:
                yield "rollout_rs_threshold", f"is null but algorithm.rollout_rs is {self.rollout_rs}: set the upper bound, e.g. 2.0"
            if self.rollout_rs_threshold_lower is not None and not self.rollout_rs.endswith("k1"):
                yield "rollout_rs_threshold_lower", (
                    f"({self.rollout_rs_threshold_lower}) is set but algorithm.rollout_rs {self.rollout_rs} has no lower bound "
                    "(only k1 criteria do); set it to null"
                )
            elif self.rollout_rs_threshold_lower is not None and self.rollout_rs_threshold is not None:
                if self.rollout_rs_threshold_lower >= self.rollout_rs_threshold:
                    yield "rollout_rs_threshold_lower", (
                        f"({self.rollout_rs_threshold_lower}) must be < rollout_rs_threshold ({self.rollout_rs_threshold})"
                    )
        if self.use_opd and not self.opd_task_reward and self.opd_kl_coef == 0:
            yield "opd_kl_coef", "(0) with algorithm.opd_task_reward false leaves every advantage 0: raise it (e.g. 1.0) or set opd_task_reward=true"
        if self.dynamic_sampling_mean_range is not None:
            low, high = self.dynamic_sampling_mean_range
            if low > high:
                yield "dynamic_sampling_mean_range", f"({[low, high]}) must be [low, high] with low <= high"
