"""megarl's configuration: nested dataclasses, the only place defaults live.

A run is one YAML file plus ``key.sub=value`` overrides::

    python -m megarl.config --config configs/moe_grpo.yaml train.steps=10 --print

Loading is strict: an unknown key is an error that names the nearest valid key, and every value is
checked against its field's type. Each section's ``__post_init__`` checks its own ranges;
:func:`validate` then checks the sections against each other, the model and the world size before
anything is built, and lists every violation with its fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``megarl`` package directory (``bundled:`` names resolve under its ``assets/``)."""
BUNDLED_PREFIX = "bundled:"


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s), the value(s) and the fix."""


class FieldError(ConfigError):
    """A field out of range, raised by a section's ``__post_init__``.

    The section does not know where it sits (the optimizer serves ``train`` and ``critic``), so the
    loader replaces ``key`` with the full dotted key and prefixes the file or override the value
    came from.

    Attributes:
        key: the field as its section names it, e.g. ``optimizer.lr``.
        problem: what is wrong and how to fix it.
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"`{key}` {problem}")
        self.key = key
        self.problem = problem


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise FieldError(key, problem)


def _require_positive(section: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 1, f"{prefix}.{name}", f"({value}) must be >= 1")


def resolve_model_path(path: str | Path) -> Path:
    """The directory a ``model.path``-like value names.

    Args:
        path: ``bundled:NAME`` for a model shipped in ``megarl/assets/models/NAME``, or a directory.

    Returns:
        The directory (not checked for existence).
    """
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return PACKAGE_DIR / "assets" / "models" / text[len(BUNDLED_PREFIX) :]
    return Path(text)


def resolve_data_path(path: str | Path) -> Path:
    """The file a ``data.train_files`` entry names.

    Args:
        path: ``bundled:NAME`` for a dataset shipped in ``megarl/assets/data/NAME``, or a file path.

    Returns:
        The file (not checked for existence).
    """
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return PACKAGE_DIR / "assets" / "data" / text[len(BUNDLED_PREFIX) :]
    return Path(text)


# Sections.


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy model: where it comes from and how Megatron builds its layers."""

    path: str = "bundled:tiny-moe"
    """HuggingFace model directory the policy starts from (config.json + safetensors);
    ``bundled:NAME`` is a tiny model shipped in megarl/assets/models (verl:
    actor_rollout_ref.model.path, slime: --hf-checkpoint)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; null: the model directory (verl: data.tokenizer)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and compute dtype. fp32 keeps CPU runs exact; bf16 is the GPU choice
    (slime: --bf16 / --fp16)."""
    attention_backend: Literal["auto", "torch", "te"] = "auto"
    """Layer implementation: Transformer Engine specs (``te``), the portable torch specs with SDPA
    (``torch``), or TE when it imports, else torch (``auto``) (OpenRLHF: --attn_implementation)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation granularity (Megatron/slime: --recompute-granularity; verl:
    enable_gradient_checkpointing)."""
    moe_grouped_gemm: bool = False
    """Grouped expert weights and GEMMs; needs TE or the grouped_gemm package on CUDA
    (Megatron/slime: --moe-grouped-gemm)."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' ranks (Megatron/slime: --moe-token-dispatcher-type)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss coefficient; 0 disables it, as RL fine-tuning usually does
    (Megatron/slime: --moe-aux-loss-coeff)."""
    seed: int = 1234
    """Seed of weight initialisation (new heads) and Megatron's RNG tracker (slime: --seed)."""

    def __post_init__(self):
        _require(bool(self.path), "model.path", "must name a HF model directory or bundled:NAME")
        _require(self.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", f"({self.moe_aux_loss_coeff}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """The training layout; data parallel is what the world size leaves: world / (TP x PP x CP)."""

    tensor: int = 1
    """TP: ranks that split each layer's weights (Megatron/slime: --tensor-model-parallel-size,
    verl: actor.megatron.tensor_model_parallel_size)."""
    pipeline: int = 1
    """PP: pipeline stages (--pipeline-model-parallel-size)."""
    virtual_pipeline: Optional[int] = None
    """VPP: model chunks per pipeline stage for the interleaved 1F1B schedule; null: plain 1F1B
    (--virtual-pipeline-model-parallel-size)."""
    context: int = 1
    """CP: ranks that split each sequence, two load-balanced chunks each (--context-parallel-size)."""
    expert: int = 1
    """EP: ranks that split the experts of each MoE layer (--expert-model-parallel-size)."""
    expert_tensor: Optional[int] = None
    """ETP: ranks that split each expert's weights; null: the same as TP, as in Megatron
    (--expert-tensor-parallel-size)."""
    sequence_parallel: bool = False
    """SP: shard the activations outside attention and MLP over the TP group; needs TP > 1
    (--sequence-parallel)."""

    def __post_init__(self):
        _require_positive(self, "parallel", ("tensor", "pipeline", "context", "expert"))
        for name in ("virtual_pipeline", "expert_tensor"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"parallel.{name}", f"({value}) must be >= 1 or null")

    @property
    def expert_tensor_size(self) -> int:
        """ETP as Megatron receives it: ``expert_tensor``, or TP when that is null."""
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def model_parallel(self) -> int:
        """Ranks holding one copy of the dense model: TP x PP x CP."""
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        """DP = world size // (TP x PP x CP); :func:`validate` checks that the division is exact."""
        return world_size // self.model_parallel()

    def min_world_size(self) -> int:
        """The smallest world size this layout fits: a multiple of TP x PP x CP (the dense model)
        and of EP x ETP x PP (the experts)."""
        return math.lcm(self.model_parallel(), self.expert * self.expert_tensor_size * self.pipeline)


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    """Prompt datasets and length limits."""

    train_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/train.jsonl"])
    """Prompt datasets (jsonl, json or parquet); ``bundled:NAME`` is a file shipped in
    megarl/assets/data (verl: data.train_files, slime: --prompt-data)."""
    train_file_weights: list[float] = dataclasses.field(default_factory=list)
    """Mixing ratios of the training files, one positive weight per entry of train_files: each
    prompt of a batch comes from file i with probability weight_i / sum, and each file is served in
    its own shuffled order, epoch after epoch; empty: the files are concatenated and the whole is
    served in one order per epoch (OpenRLHF: --prompt_data_probs)."""
    val_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/val.jsonl"])
    """Validation datasets; empty: no validation (verl: data.val_files, slime: --eval-prompt-data)."""
    max_samples: Optional[int] = None
    """Use at most the first N usable training prompts, in file order after length filtering and
    truncation; null: all of them (verl: data.train_max_samples, OpenRLHF: --max_samples)."""
    val_max_samples: Optional[int] = None
    """The same limit for the validation prompts (verl: data.val_max_samples)."""
    prompt_key: str = "prompt"
    """Row field holding the prompt: a string or a list of chat messages (verl: data.prompt_key,
    slime: --input-key)."""
    answer_key: str = "answer"
    """Row field holding the reference answer the reward checks; a dotted path reaches into nested
    fields, e.g. ``reward_model.ground_truth`` for verl's parquet rows (verl: reward_model.ground_truth
    of each row, slime: --label-key)."""
    apply_chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template (slime/OpenRLHF: --apply-chat-template)."""
    max_prompt_length: int = 64
    """Prompt length limit, tokens (verl: data.max_prompt_length)."""
    max_response_length: int = 16
    """Generated length limit, tokens (verl: data.max_response_length, slime:
    --rollout-max-response-len)."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than max_prompt_length; false: keep them as truncation says (verl:
    data.filter_overlong_prompts)."""
    truncation: Literal["error", "left", "right"] = "error"
    """What happens to a prompt longer than max_prompt_length that filter_overlong_prompts keeps:
    ``error`` stops with the file and row, ``left`` keeps its last max_prompt_length tokens,
    ``right`` its first; a truncated prompt's text (what the reward sees) is its truncated tokens,
    decoded (verl: data.truncation)."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (verl: data.shuffle, slime: --rollout-shuffle)."""
    seed: int = 1
    """Shuffling seed; with train_file_weights also the seed of each batch's files."""

    def __post_init__(self):
        _require(bool(self.train_files), "data.train_files", "must list at least one file")
        _require_positive(self, "data", ("max_prompt_length", "max_response_length"))
        for name in ("max_samples", "val_max_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name}", f"({value}) must be >= 1, or null")
        if self.train_file_weights:
            _require(
                len(self.train_file_weights) == len(self.train_files),
                "data.train_file_weights",
                f"(length {len(self.train_file_weights)}) must have the length of `data.train_files` ({len(self.train_files)}): "
                f"one positive weight per file, or an empty list to concatenate the files",
            )
            _require(
                all(weight > 0 for weight in self.train_file_weights),
                "data.train_file_weights",
                f"({self.train_file_weights}) must all be > 0: remove a file from data.train_files instead of giving it weight 0",
            )
        _require(
            self.truncation == "error" or not self.filter_overlong_prompts,
            "data.truncation",
            f"({self.truncation}) has no effect while data.filter_overlong_prompts is true (it drops every prompt "
            f"over the limit): set data.filter_overlong_prompts=false to truncate them",
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """Generation: the engines, sampling, and how new weights reach them."""

    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Rollout engine: SGLang on GPUs, the embedded transformers server (``hf``) anywhere; ``auto``
    is sglang when CUDA is present and sglang imports, else hf (verl: actor_rollout_ref.rollout.name)."""
    num_engines: int = 1
    """Engine servers to launch, each over engine_tensor_parallel devices; ignored when engine_urls
    is set (OpenRLHF: --vllm_num_engines)."""
    engine_tensor_parallel: int = 1
    """Tensor parallel size inside each engine (verl: rollout.tensor_model_parallel_size, slime:
    --rollout-num-gpus-per-engine)."""
    batch_size: int = 16
    """Prompts per rollout round (verl: data.train_batch_size, slime: --rollout-batch-size)."""
    n_samples_per_prompt: int = 8
    """Responses sampled per prompt: the group of GRPO and RLOO (verl: rollout.n, slime:
    --n-samples-per-prompt)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides its logits by it too, so its log-probs match the
    engine's (verl: rollout.temperature, slime: --rollout-temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold, in (0, 1]; 1 disables it (slime: --rollout-top-p)."""
    top_k: int = -1
    """Top-k sampling; -1 disables it (slime: --rollout-top-k)."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Token ids that end a response besides EOS (slime: --rollout-stop-token-ids)."""
    mem_fraction: float = 0.5
    """Fraction of GPU memory SGLang may hold for weights and KV cache (SGLang: mem_fraction_static,
    verl: rollout.gpu_memory_utilization, slime: --sglang-mem-fraction-static)."""
    colocate: bool = True
    """Engines share the training devices and release their memory during the update (verl: hybrid
    engine, slime: --colocate)."""
    weight_transport: Literal["tensor", "nccl", "disk"] = "tensor"
    """How new weights reach the engines: same-host tensor handles (CUDA IPC, shared-memory files on
    CPU), an NCCL broadcast group (disaggregated engines), or safetensors files (the fallback)
    (OpenRLHF: --vllm_sync_backend)."""
    bucket_mb: int = 512
    """Size cap of one weight-update bucket, MiB. 512 MiB is the measured knee: larger buckets add
    memory without raising throughput (docs/benchmarks.md, tools/bench_weight_sync.py)
    (slime: --update-weight-buffer-size)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """Connect to engines already running at these URLs instead of launching them."""
    request_timeout_s: float = 600.0
    """Timeout of one engine request, seconds."""
    health_check_interval_s: float = 10.0
    """Seconds between engine health checks."""
    health_timeout_s: float = 20.0
    """An engine that does not answer a health check within this many seconds is restarted."""
    startup_timeout_s: float = 600.0
    """Seconds an engine may take to start and load its model."""
    engine_threads: Optional[int] = None
    """CPU threads of each ``hf`` engine; null: torch's default (all cores). On a small shared CPU
    1 keeps the engine from competing with the training processes."""
    deterministic: bool = False
    """SGLang's deterministic inference (--enable-deterministic-inference): per-sample seeds are
    honoured and a rerun samples the same tokens, at some speed cost. The hf engine always is."""
    restart_budget: int = 3
    """Engine restarts allowed during the run before it stops."""
    val_temperature: float = 0.0
    """Sampling temperature of validation; 0 is greedy (verl: rollout.val_kwargs.temperature)."""
    val_n_samples: int = 1
    """Responses per validation prompt (verl: rollout.val_kwargs.n, slime: --n-samples-per-eval-prompt)."""
    seed: int = 1
    """Sampling seed (slime: --rollout-seed)."""

    def __post_init__(self):
        _require_positive(
            self, "rollout", ("num_engines", "engine_tensor_parallel", "batch_size", "n_samples_per_prompt", "bucket_mb", "val_n_samples")
        )
        _require(self.temperature > 0, "rollout.temperature", f"({self.temperature}) must be > 0")
        _require(self.val_temperature >= 0, "rollout.val_temperature", f"({self.val_temperature}) must be >= 0 (0 is greedy)")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"({self.top_p}) must be in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", f"({self.top_k}) must be -1 (off) or >= 1")
        _require(all(token >= 0 for token in self.stop_token_ids), "rollout.stop_token_ids", f"({self.stop_token_ids}) must be >= 0")
        _require(0 < self.mem_fraction < 1, "rollout.mem_fraction", f"({self.mem_fraction}) must be in (0, 1)")
        _require(self.request_timeout_s > 0, "rollout.request_timeout_s", f"({self.request_timeout_s}) must be > 0")
        _require(self.health_check_interval_s > 0, "rollout.health_check_interval_s", f"({self.health_check_interval_s}) must be > 0")
        _require(self.health_timeout_s > 0, "rollout.health_timeout_s", f"({self.health_timeout_s}) must be > 0")
        _require(self.startup_timeout_s > 0, "rollout.startup_timeout_s", f"({self.startup_timeout_s}) must be > 0")
        _require(self.engine_threads is None or self.engine_threads >= 1, "rollout.engine_threads", f"({self.engine_threads}) must be >= 1, or null")
        _require(self.restart_budget >= 0, "rollout.restart_budget", f"({self.restart_budget}) must be >= 0")


KLEstimator = Literal["k1", "k2", "k3", "abs"]


@dataclasses.dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    """Advantages, the policy loss, KL, train/rollout mismatch corrections, reward shaping and filters."""

    advantage_estimator: Literal["grpo", "gae", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """How advantages are computed; gae trains a critic (verl: algorithm.adv_estimator, slime:
    --advantage-estimator)."""
    gamma: float = 1.0
    """Discount factor per token, in [0, 1] (gae, reinforce_pp) (verl: algorithm.gamma)."""
    lam: float = 1.0
    """GAE lambda, in [0, 1] (verl: algorithm.lam)."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std; false is Dr. GRPO (verl: algorithm.norm_adv_by_std_in_grpo)."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """Policy objective: token-level PPO clip, GSPO (sequence-level ratio) or CISPO (clipped
    importance weight, gradient through every token) (verl: actor.policy_loss.loss_mode)."""
    clip_ratio_low: float = 0.2
    """PPO clip below 1: the ratio is kept >= 1 - clip_ratio_low (verl: actor.clip_ratio_low, slime:
    --eps-clip)."""
    clip_ratio_high: float = 0.2
    """PPO clip above 1: the ratio is kept <= 1 + clip_ratio_high; above clip_ratio_low it is DAPO's
    clip-higher (verl: actor.clip_ratio_high, slime: --eps-clip-high)."""
    clip_ratio_c: Optional[float] = None
    """Dual-clip bound (> 1, e.g. 3.0) for negative advantages; null disables it. Off by default,
    where verl's is on at 3.0: set 3.0 to match verl (verl: actor.clip_ratio_c, slime: --eps-clip-c)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses become one number (verl: actor.loss_agg_mode)."""
    entropy_coeff: float = 0.0
    """Entropy bonus coefficient (verl: actor.entropy_coeff, slime: --entropy-coef)."""
    use_kl_in_reward: bool = False
    """Subtract a KL-to-reference penalty from the token rewards (verl: algorithm.use_kl_in_reward)."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator of the reward penalty (verl: algorithm.kl_penalty)."""
    kl_ctrl: Literal["fixed", "adaptive"] = "fixed"
    """Controller of the reward penalty's coefficient (verl: algorithm.kl_ctrl.type)."""
    kl_coef: float = 0.001
    """Reward penalty coefficient; the initial one when adaptive (verl: algorithm.kl_ctrl.kl_coef)."""
    kl_target: float = 0.1
    """Adaptive controller: target KL per token (verl: algorithm.kl_ctrl.target_kl)."""
    kl_horizon: int = 10000
    """Adaptive controller: horizon, samples (verl: algorithm.kl_ctrl.horizon)."""
    use_kl_loss: bool = False
    """Add KL to the reference policy as a loss term (verl: actor.use_kl_loss, slime: --use-kl-loss)."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss term (verl: actor.kl_loss_coef, slime: --kl-loss-coef)."""
    kl_loss_estimator: KLEstimator = "k3"
    """KL estimator of the loss term; k3 is verl's low_var_kl (verl: actor.kl_loss_type, slime:
    --kl-loss-type)."""
    tis: bool = False
    """Truncated importance sampling: weight each token by its train/rollout probability ratio,
    clipped to [tis_threshold_low, tis_threshold_high] (slime: --use-tis)."""
    tis_threshold_low: float = 0.0
    """TIS: lower bound of the weight (slime: --tis-clip-low)."""
    tis_threshold_high: float = 2.0
    """TIS: upper bound of the weight (slime: --tis-clip)."""
    icepop: bool = False
    """ICEPOP: mask tokens whose train/rollout probability ratio leaves [icepop_low, icepop_high]
    (OpenRLHF: --use_icepop)."""
    icepop_low: float = 0.5
    """ICEPOP: lower ratio bound."""
    icepop_high: float = 2.0
    """ICEPOP: upper ratio bound."""
    reward_clip: Optional[float] = None
    """Clip scores to [-reward_clip, reward_clip]; null disables it (OpenRLHF: --reward_clip)."""
    reward_norm: Literal["none", "batch", "group", "running"] = "none"
    """Score normalisation before the advantage estimator: over the batch, within each group, or by
    running moments (OpenRLHF: --reward_running_norm)."""
    overlong_penalty: bool = False
    """DAPO soft overlong penalty on responses near data.max_response_length."""
    overlong_buffer_length: int = 4
    """Tokens before the length limit over which the penalty ramps from 0 to overlong_penalty_factor
    (verl: reward_model.overlong_buffer.len)."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the length limit (verl: reward_model.overlong_buffer.penalty_factor)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose scores are all equal (no signal) and roll out again
    until the train batch is full (OpenRLHF: --dynamic_filtering, slime: --dynamic-sampling-filter-path)."""
    dynamic_sampling_mean_range: Optional[tuple[float, float]] = None
    """With dynamic sampling, also drop groups whose mean score lies outside [low, high]; null keeps
    them (OpenRLHF: --dynamic_filtering_reward_range)."""
    filter_overlong: bool = False
    """Mask out of the loss the responses cut at the length limit (DAPO overlong filtering)."""

    def __post_init__(self):
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"algorithm.{name}", f"({value}) must be in [0, 1]")
        _require(0 <= self.clip_ratio_low < 1, "algorithm.clip_ratio_low", f"({self.clip_ratio_low}) must be in [0, 1)")
        _require(self.clip_ratio_high >= 0, "algorithm.clip_ratio_high", f"({self.clip_ratio_high}) must be >= 0")
        _require(self.clip_ratio_c is None or self.clip_ratio_c > 1, "algorithm.clip_ratio_c", f"({self.clip_ratio_c}) must be > 1, or null")
        _require(
            self.clip_ratio_c is None or self.policy_loss != "cispo",
            "algorithm.clip_ratio_c",
            f"({self.clip_ratio_c}) must be null with algorithm.policy_loss = cispo (CISPO has no dual clip)",
        )
        for name in ("entropy_coeff", "kl_coef", "kl_loss_coef", "overlong_penalty_factor", "tis_threshold_low"):
            value = getattr(self, name)
            _require(value >= 0, f"algorithm.{name}", f"({value}) must be >= 0")
        _require(self.kl_target > 0, "algorithm.kl_target", f"({self.kl_target}) must be > 0")
        _require(self.kl_horizon >= 1, "algorithm.kl_horizon", f"({self.kl_horizon}) must be >= 1")
        _require(
            self.tis_threshold_low < self.tis_threshold_high,
            "algorithm.tis_threshold_low",
            f"({self.tis_threshold_low}) must be < tis_threshold_high ({self.tis_threshold_high})",
        )
        _require(
            0 < self.icepop_low < self.icepop_high,
            "algorithm.icepop_low",
            f"({self.icepop_low}) must be > 0 and < icepop_high ({self.icepop_high})",
        )
        _require(
            not (self.tis and self.icepop),
            "algorithm.icepop",
            "and algorithm.tis are both true: each weights a token by the importance ratio, so together they apply it twice; pick one",
        )
        _require(self.reward_clip is None or self.reward_clip > 0, "algorithm.reward_clip", f"({self.reward_clip}) must be > 0, or null")
        _require(self.overlong_buffer_length >= 1, "algorithm.overlong_buffer_length", f"({self.overlong_buffer_length}) must be >= 1")
        if self.dynamic_sampling_mean_range is not None:
            low, high = self.dynamic_sampling_mean_range
            _require(low <= high, "algorithm.dynamic_sampling_mean_range", f"({[low, high]}) must be [low, high] with low <= high")


@dataclasses.dataclass(kw_only=True, slots=True)
class RewardConfig:
    """Where scores come from and how scoring is isolated."""

    type: Literal["rule", "function", "remote", "model"] = "rule"
    """Where scores come from: a bundled rule, a user function, a remote URL or a reward model
    (verl: reward_model.enable / custom_reward_function, slime: --rm-type)."""
    rule: Literal["toy", "math"] = "toy"
    """Bundled rule (type rule): the toy tasks' checker, or math answers compared with math-verify."""
    function: Optional[str] = None
    """User reward as ``path/to/file.py:name`` (type function), with megarl's signature
    ``(prompt, response, answer, **row)`` or verl's ``(data_source, solution_str, ground_truth,
    extra_info)`` (verl: custom_reward_function.path and .name, slime: --custom-rm-path)."""
    batched: bool = False
    """The function (type function) scores a list of samples per call and returns a list of scores;
    reward.timeout_s then applies to a call (verl: reward_model.reward_manager=batch)."""
    url: Optional[str] = None
    """Remote reward endpoint (type remote) (OpenRLHF: --remote_rm_url, slime: --rm-url)."""
    model_path: Optional[str] = None
    """HF sequence-classification reward model directory (type model) (verl: reward_model.model.path)."""
    num_workers: int = 2
    """Reward worker processes (rule, function and model)."""
    timeout_s: float = 10.0
    """Timeout of one sample's scoring (one request when remote), seconds; a timeout scores 0 and is counted."""
    max_failure_rate: float = 0.5
    """Stop the run when more than this fraction of a batch fails to score, in [0, 1]."""
    remote_batch_size: int = 32
    """Samples per remote request."""
    remote_retries: int = 3
    """Retries of a failed remote request."""

    def __post_init__(self):
        needed = {
            "function": ("function", "path/to/file.py:name"),
            "remote": ("url", "an http(s) URL"),
            "model": ("model_path", "a HF directory"),
        }
        if self.type in needed:
            name, form = needed[self.type]
            _require(bool(getattr(self, name)), f"reward.{name}", f"must be set ({form}) when reward.type is '{self.type}'")
        if self.type == "function":
            _require(":" in self.function, "reward.function", f"({self.function!r}) must look like path/to/file.py:function_name")
        else:
            _require(not self.batched, "reward.batched", f"applies to reward.type function, not {self.type!r}: remove it")
        _require_positive(self, "reward", ("num_workers", "remote_batch_size"))
        _require(self.timeout_s > 0, "reward.timeout_s", f"({self.timeout_s}) must be > 0")
        _require(0 <= self.max_failure_rate <= 1, "reward.max_failure_rate", f"({self.max_failure_rate}) must be in [0, 1]")
        _require(self.remote_retries >= 0, "reward.remote_retries", f"({self.remote_retries}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """Adam settings, shared by the policy (``train.optimizer``) and the critic (``critic.optimizer``)."""

    lr: float = 1e-6
    """Peak learning rate (verl: actor.optim.lr, slime: --lr)."""
    min_lr: float = 0.0
    """Learning rate at the end of linear or cosine decay, in [0, lr] (slime: --min-lr)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay (verl: optim.weight_decay, slime: --weight-decay)."""
    adam_beta1: float = 0.9
    """Adam beta1 (slime: --adam-beta1)."""
    adam_beta2: float = 0.999
    """Adam beta2 (slime: --adam-beta2)."""
    adam_eps: float = 1e-8
    """Adam epsilon (slime: --adam-eps)."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 disables it (verl: actor.grad_clip, slime: --clip-grad)."""

    def __post_init__(self):
        _require(self.lr > 0, "optimizer.lr", f"({self.lr}) must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", f"({self.min_lr}) must be in [0, lr] = [0, {self.lr}]")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", f"({self.weight_decay}) must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"optimizer.{name}", f"({value}) must be in [0, 1)")
        _require(self.adam_eps > 0, "optimizer.adam_eps", f"({self.adam_eps}) must be > 0")
        _require(self.clip_grad >= 0, "optimizer.clip_grad", f"({self.clip_grad}) must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The policy update: RL steps, the batch hierarchy, optimizer and schedule."""

    steps: Optional[int] = 200
    """RL steps to run; a step rolls out, scores and trains on one train batch; null: from
    total_epochs (verl: trainer.total_training_steps, slime: --num-rollout)."""
    total_epochs: Optional[int] = None
    """Passes over the training prompts, instead of steps (which must then be null): once the data
    is loaded the run takes total_epochs x ceil(prompts / (global_batch_size / n_samples_per_prompt))
    steps, the prompts a step trains on (verl: trainer.total_epochs, slime: --num-epoch, OpenRLHF:
    --num_episodes)."""
    global_batch_size: int = 128
    """Samples (prompt + response) trained on per RL step: the train batch. It holds at least one
    rollout round (rollout.batch_size x n_samples_per_prompt) and whole groups; the step rolls out
    rounds until it is full (LightRFT: --train_batch_size)."""
    mini_batch_size: int = 64
    """Samples per optimizer step (verl: actor.ppo_mini_batch_size x rollout.n, slime:
    --global-batch-size)."""
    micro_batch_size: int = 8
    """Samples per forward/backward on each data-parallel rank (verl: ppo_micro_batch_size_per_gpu,
    slime: --micro-batch-size)."""
    dynamic_batch: bool = False
    """Fill micro-batches up to max_tokens_per_micro_batch tokens instead of micro_batch_size samples
    (verl: actor.use_dynamic_bsz, slime: --use-dynamic-batch-size)."""
    max_tokens_per_micro_batch: int = 4096
    """Token budget of one dynamic micro-batch on each data-parallel rank, padding included (samples
    x the longest one's length) (verl: ppo_max_token_len_per_gpu, slime: --max-tokens-per-gpu)."""
    ppo_epochs: int = 1
    """Passes over each train batch (verl: actor.ppo_epochs)."""
    fused_linear_logprob: bool = True
    """Compute log-probs and entropy from the last hidden states and the output layer's weight shard
    in one fused pass that never holds the [tokens, vocab] logits; false: from Megatron's logits
    (LightRFT: --fused_linear_logprob)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Policy optimizer: Adam through Megatron's optimizer."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up, from optimizer.lr to optimizer.min_lr over the run
    (verl: optim.warmup_style, slime: --lr-decay-style)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to optimizer.lr; a run with fewer optimizer steps
    warms up over all of them (with a warning) (slime: --lr-warmup-iters, verl: optim.lr_warmup_steps)."""
    lr_warmup_ratio: float = 0.0
    """Warm-up as a fraction of the run's optimizer steps, in [0, 1), instead of lr_warmup_steps
    (verl: optim.lr_warmup_steps_ratio)."""
    use_distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (Megatron/slime: --use-distributed-optimizer)."""
    max_consecutive_nan_steps: int = 3
    """Optimizer steps with a NaN/inf gradient are skipped; this many in a row stop the run."""
    eval_every: int = 10
    """Validate every N RL steps; 0: never (verl: trainer.test_freq, slime: --eval-interval)."""
    seed: int = 42
    """Seed of batch shuffling between mini-batches."""

    def __post_init__(self):
        _require_positive(
            self, "train", ("global_batch_size", "mini_batch_size", "micro_batch_size", "max_tokens_per_micro_batch", "ppo_epochs", "max_consecutive_nan_steps")
        )
        for name in ("lr_warmup_steps", "eval_every"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name}", f"({value}) must be >= 0")
        _require(0 <= self.lr_warmup_ratio < 1, "train.lr_warmup_ratio", f"({self.lr_warmup_ratio}) must be in [0, 1)")
        _require(
            not (self.lr_warmup_ratio and self.lr_warmup_steps), "train.lr_warmup_ratio",
            f"({self.lr_warmup_ratio}) and `train.lr_warmup_steps` ({self.lr_warmup_steps}) both set the warm-up: "
            f"set train.lr_warmup_steps=0 to use the ratio, or drop train.lr_warmup_ratio",
        )
        for name in ("steps", "total_epochs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"train.{name}", f"({value}) must be >= 1, or null")
        _require(
            self.steps is None or self.total_epochs is None,
            "train.total_epochs",
            f"({self.total_epochs}) and `train.steps` ({self.steps}) both set the run's length: "
            f"set train.steps=null to train for epochs, or drop train.total_epochs",
        )
        _require(
            self.steps is not None or self.total_epochs is not None,
            "train.steps",
            "and `train.total_epochs` are both null: set train.steps to the RL steps to run, or "
            "train.total_epochs to the passes over the training prompts",
        )

    def optimizer_steps(self) -> int:
        """Optimizer steps in the whole run: steps x ppo_epochs x (global / mini batch).

        Raises:
            ConfigError: ``steps`` is still null (:func:`resolve_steps` sets it once the data is loaded).
        """
        if self.steps is None:
            raise ConfigError("`train.steps` is null until the data is loaded: resolve it with megarl.config.resolve_steps first")
        return self.steps * self.ppo_epochs * (self.global_batch_size // self.mini_batch_size)

    def warmup_steps(self) -> int:
        """Optimizer steps of warm-up: ``lr_warmup_ratio`` of the run's, or ``lr_warmup_steps``
        but at most the run's (:meth:`warmup_clamped` says when that cuts it)."""
        total = self.optimizer_steps()
        if self.lr_warmup_ratio:
            return int(self.lr_warmup_ratio * total)
        return min(self.lr_warmup_steps, total)

    def warmup_clamped(self) -> str | None:
        """A warning when ``lr_warmup_steps`` exceeds the run's optimizer steps, else None (also
        while ``steps`` waits for the data: :func:`resolve_steps`)."""
        if self.steps is None:
            return None
        total = self.optimizer_steps()
        if self.lr_warmup_steps <= total:
            return None
        return (
            f"`train.lr_warmup_steps` ({self.lr_warmup_steps}) exceeds the run's {total} optimizer steps (train.steps x "
            f"ppo_epochs x global_batch_size / mini_batch_size): warming up over all {total}; "
            f"train.lr_warmup_ratio scales with the run's length"
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class CriticConfig:
    """The value model, trained when ``algorithm.advantage_estimator`` is gae (:attr:`Config.critic_enabled`)."""

    path: Optional[str] = None
    """Critic initialisation, a HF directory; null: the policy's weights with a fresh value head
    (verl: critic.model.path, OpenRLHF: --critic_pretrain)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    """Critic optimizer (verl: critic.optim, OpenRLHF: --critic_learning_rate)."""
    value_clip: Optional[float] = 0.5
    """Value-loss clipping around the old values; null disables it (verl: critic.cliprange_value)."""
    warmup_steps: int = 0
    """First RL steps that train only the critic (verl: trainer.critic_warmup)."""

    def __post_init__(self):
        _require(self.value_clip is None or self.value_clip > 0, "critic.value_clip", f"({self.value_clip}) must be > 0, or null")
        _require(self.warmup_steps >= 0, "critic.warmup_steps", f"({self.warmup_steps}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming."""

    dir: Optional[str] = None
    """Checkpoint root; null: ``<run dir>/checkpoints`` (verl: trainer.default_local_dir, slime: --save)."""
    save_every: int = 0
    """Save every N RL steps; 0: only at the end (verl: trainer.save_freq, slime: --save-interval)."""
    keep_last: int = 2
    """Committed checkpoints to keep (verl: trainer.max_actor_ckpt_to_keep)."""
    resume: str = "auto"
    """``auto``: the latest committed checkpoint if there is one; ``never``; or a checkpoint path
    (verl: trainer.resume_mode / resume_from_path, slime: --load)."""
    save_hf: bool = False
    """Also export the final policy as a HF directory (OpenRLHF: --save_hf_ckpt)."""

    def __post_init__(self):
        _require(self.save_every >= 0, "checkpoint.save_every", f"({self.save_every}) must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"({self.keep_last}) must be >= 1")
        _require(bool(self.resume), "checkpoint.resume", "must be 'auto', 'never' or a checkpoint path")


@dataclasses.dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """The run directory and the metrics sinks."""

    name: str = "megarl"
    """Run name (verl: trainer.experiment_name, slime: --wandb-group)."""
    run_dir: str = "runs/{name}"
    """Where metrics.jsonl, the resolved config and (by default) checkpoints go; ``{name}`` is
    replaced by the run name."""
    console: bool = True
    """Print a line of metrics every log_every steps."""
    tensorboard: bool = False
    """Write TensorBoard events under the run directory (OpenRLHF: --use_tensorboard)."""
    wandb: bool = False
    """Log to Weights & Biases (slime: --use-wandb)."""
    wandb_project: str = "megarl"
    """W&B project (verl: trainer.project_name, slime: --wandb-project)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode; offline needs no network (slime: --wandb-mode)."""
    log_every: int = 1
    """Print the console line every N RL steps; metrics.jsonl, TensorBoard and W&B get every step
    (OpenRLHF: --logging_steps)."""
    console_metrics: list[str] = dataclasses.field(default_factory=list)
    """More metrics for the console line, by name (e.g. ``reward/length``, an extra number a reward
    function returns); metrics.jsonl has them all either way."""

    def __post_init__(self):
        _require(bool(self.name) and "/" not in self.name, "logging.name", f"({self.name!r}) must be a non-empty name without '/'")
        _require(bool(self.run_dir), "logging.run_dir", "must be a directory, e.g. runs/{name}")
        _require(self.log_every >= 1, "logging.log_every", f"({self.log_every}) must be >= 1")

    def resolved_run_dir(self) -> Path:
        """``run_dir`` with ``{name}`` replaced by the run name."""
        return Path(self.run_dir.replace("{name}", self.name))


@dataclasses.dataclass(kw_only=True, slots=True)
class Config:
    """A whole run: one section per component."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The policy model and how its layers are built."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """The training layout (TP, PP, VPP, CP, EP, ETP, SP); DP is derived from the world size."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Prompt datasets and length limits."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """Generation: engines, sampling, weight updates."""
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    """Advantages, policy loss, KL, mismatch corrections, reward shaping and filters."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """Scoring."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The policy update: batch sizes, optimizer, schedule."""
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    """The value model; trained only when algorithm.advantage_estimator is gae."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics sinks and the run directory."""

    @property
    def critic_enabled(self) -> bool:
        """Whether the run trains a critic: derived from the estimator (gae needs values)."""
        return self.algorithm.advantage_estimator == "gae"

    def resolved_checkpoint_dir(self) -> Path:
        """``checkpoint.dir``, or ``<run dir>/checkpoints`` when it is null."""
        if self.checkpoint.dir is not None:
            return Path(self.checkpoint.dir)
        return self.logging.resolved_run_dir() / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain YAML-safe values (tuples become lists)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# Loading: YAML and overrides, strictly typed.


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the module uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name, annotation in _field_types(cls).items():
        keys.append(prefix + name)
        if _is_section(annotation):
            keys += _all_keys(annotation, f"{prefix}{name}.")
    return tuple(keys)


def _unknown_key(key: str, source: str) -> ConfigError:
    """An error for ``key`` naming the nearest valid key among all dotted keys: first one ending in
    the same name (``train.lr`` -> ``train.optimizer.lr``), else the closest spelling."""
    candidates = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [candidate for candidate in candidates if candidate.rsplit(".", 1)[-1] == leaf]
    nearest = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f" — did you mean `{nearest[0]}`?" if nearest else ""
    return ConfigError(f"{source}: unknown key `{key}`{hint}")


_SCALARS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def _leaf_key(key: str, value: Any) -> str:
    """``key`` extended along the first nested mapping of ``value`` to a leaf: the key the user
    meant to set (``trian`` with ``{steps: 3}`` -> ``trian.steps``), so that the suggestion is the
    nearest leaf (``train.steps``)."""
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _describe(annotation: Any) -> str:
    """``annotation`` (not Optional) as the error messages say it: "an integer", "one of 'a', 'b'",
    "a list of 2 numbers" (lists and tuples of one item type)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, tuple):
        count = "" if origin is list or args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_SCALARS[args[0]][1]}"
    return _SCALARS[annotation][0]


# YAML 1.1 reads `1e-6` (no dot) as a string; a float field accepts what is clearly a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, annotation: Any, key: str, source: str, nullable: bool = False) -> Any:
    """``value`` checked against (and converted to) ``annotation``; ``nullable`` says that the
    field is ``Optional[annotation]``, for the message.

    Raises:
        ConfigError: naming ``source``, ``key``, the value and the expected type.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    def mismatch() -> ConfigError:
        expected = _describe(annotation)
        return ConfigError(f"{source}: `{key}` = {value!r} must be {'null or ' if nullable else ''}{expected}")

    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(value, inner, key, source, nullable=True)
    if origin is Literal:
        if value not in args:
            raise mismatch()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if origin is list or args[-1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(value) != len(args):
            raise mismatch()
        else:
            item_types = list(args)
        items = [_convert(item, item_type, f"{key}[{index}]", source) for index, (item, item_type) in enumerate(zip(value, item_types))]
        return items if origin is list else tuple(items)
    if annotation is float and isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not annotation:
        raise mismatch()
    return value


def _typed(cls: type, raw: Any, prefix: str, source: str) -> dict[str, Any]:
    """Check a nested mapping from ``source`` against section ``cls``: keys exist, values have
    their field's type. Returns the mapping with converted values (sections as nested dicts)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        where = f"`{prefix[:-1]}`" if prefix else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping of field: value, got {raw!r}")
    types_by_name = _field_types(cls)
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in types_by_name:
            raise _unknown_key(_leaf_key(key, value), source)
        annotation = types_by_name[name]
        if _is_section(annotation):
            typed[name] = _typed(annotation, value, f"{key}.", source)
        elif isinstance(value, dict) and value:
            raise _unknown_key(_leaf_key(key, value), source)
        else:
            typed[name] = _convert(value, annotation, key, source)
    return typed


def _merge(into: dict[str, Any], update: dict[str, Any], origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``into`` (nested mappings merge, values replace) and record ``source``
    as the origin of every value it sets."""
    for name, value in update.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            _merge(into.setdefault(name, {}), value, origins, source, f"{key}.")
        else:
            into[name] = value
            origins.pop(key, None)  # keep the latest setting last
            origins[key] = source


def _origin(key: str, prefix: str, origins: dict[str, str], fallback_source: str) -> str:
    """Where ``key``'s value came from; for a field left at its default (``reward.function``
    missing), where the section's latest value came from (``reward.type=function``)."""
    if key in origins:
        return origins[key]
    in_section = [source for set_key, source in origins.items() if set_key.startswith(prefix)]
    return in_section[-1] if in_section else fallback_source


def _instantiate(cls: type, typed: dict[str, Any], base: Any, prefix: str, origins: dict[str, str], fallback_source: str) -> Any:
    """Section ``cls`` from ``base`` (its default instance) with the ``typed`` values applied; a
    range error names the full key and the file or override its value came from."""
    kwargs = {field.name: getattr(base, field.name) for field in dataclasses.fields(cls)}
    for name, annotation in _field_types(cls).items():
        if name not in typed:
            continue
        if _is_section(annotation):
            kwargs[name] = _instantiate(annotation, typed[name], kwargs[name], f"{prefix}{name}.", origins, fallback_source)
        else:
            kwargs[name] = typed[name]
    try:
        return cls(**kwargs)
    except FieldError as error:
        key = prefix + error.key.rsplit(".", 1)[-1]
        raise ConfigError(f"{_origin(key, prefix, origins, fallback_source)}: `{key}` {error.problem}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split a command-line override.

    Args:
        text: ``key.sub=value``; the value is read as YAML (``10``, ``1e-3``, ``true``, ``null``,
            ``[1, 2]``; an empty value is null).

    Returns:
        The dotted key and the parsed value.

    Raises:
        ConfigError: no ``=``, no key, or a value that is not valid YAML.
    """
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator:
        raise ConfigError(f"override `{text}` must look like key.sub=value (e.g. train.steps=10)")
    if not key or "" in key.split("."):
        raise ConfigError(f"override `{text}` needs a dotted key before '=' (e.g. train.steps=10)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({error.problem})") from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, refusing a key given twice in one mapping (YAML would keep
    the last silently: a second ``train:`` section would undo the first)."""
    text = path.read_text()
    _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
    return yaml.safe_load(text)


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: the typed loading refuses it
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_lines:
                raise ConfigError(
                    f"{path}:{line}: `{prefix}{key}` is given twice (lines {first_lines[key]} and {line}); YAML would keep only "
                    f"the second: merge them into one"
                )
            first_lines.setdefault(key, line)
            _refuse_duplicate_keys(value_node, path, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix[:-1]}[{index}].")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply command-line overrides, strictly.

    Args:
        path: the YAML file; None starts from the defaults alone.
        overrides: ``key.sub=value`` strings, applied in order after the file.

    Returns:
        The config, every field filled (defaults live only in the dataclasses).

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrong type, or a value out of
            range; the message names the file or the override, and the dotted key.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    fallback_source = "overrides"
    if path is not None:
        fallback_source = str(path)
        try:
            raw = _read_yaml(Path(path))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        _merge(values, _typed(Config, raw, "", str(path)), origins, str(path))
    for override in overrides:
        source = f"override `{override}`"
        _merge(values, _typed(Config, _nest(*parse_override(override)), "", source), origins, source)
    return _instantiate(Config, values, Config(), "", origins, fallback_source)


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML with every field, loadable again by :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# Cross-field validation.


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFacts:
    """The model dimensions validation needs, read from a HF config.json alone (no weights)."""

    num_layers: int
    """Transformer layers (num_hidden_layers)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (num_key_value_heads; equal to the heads without GQA)."""
    num_experts: int
    """Routed experts per MoE layer; 0 for a dense model."""
    vocab_size: int
    """Vocabulary entries (before Megatron pads it)."""
    max_position_embeddings: int
    """Longest sequence the position embedding covers, tokens."""

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelFacts:
        """Read ``path/config.json``.

        Args:
            path: a HF model directory.

        Raises:
            ConfigError: the file is missing, is not JSON, or lacks a required key.
        """
        config_file = Path(path) / "config.json"
        try:
            hf_config = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{config_file} does not exist: a model path must be a HF model directory holding config.json") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_file}: not valid JSON ({error})") from None
        missing = [key for key in ("num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings") if key not in hf_config]
        if missing:
            raise ConfigError(f"{config_file}: missing {', '.join(missing)}")
        experts = hf_config.get("num_experts") or hf_config.get("num_local_experts") or hf_config.get("n_routed_experts") or 0
        return cls(
            num_layers=hf_config["num_hidden_layers"],
            num_attention_heads=hf_config["num_attention_heads"],
            num_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            num_experts=experts,
            vocab_size=hf_config["vocab_size"],
            max_position_embeddings=hf_config["max_position_embeddings"],
        )


def _divisors(number: int) -> list[int]:
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def _one_of(options: Sequence[int]) -> str:
    """``[1, 2, 4]`` -> ``"1, 2 or 4"``."""
    words = [str(option) for option in options]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@dataclasses.dataclass(frozen=True, slots=True)
class LayoutSpelling:
    """How the user wrote the layout: the config's keys (``parallel.tensor=2``) or a tool's flags
    (``--tp 2``). Layout errors quote the fields and their fixes in the user's own words."""

    names: Mapping[str, str]
    """ParallelConfig field -> what the user writes (``parallel.tensor``, ``--tp``)."""
    separator: str = "="
    """Between a name and a value in a fix (``parallel.tensor=2``, ``--tp 2``)."""
    unset: str = "set {name}=null"
    """The fix that returns an optional field to its default."""

    def field(self, name: str) -> str:
        return f"`{self.names[name]}`"

    def setting(self, name: str, value: Any) -> str:
        return f"{self.names[name]}{self.separator}{value}"

    def unsetting(self, name: str) -> str:
        return self.unset.format(name=self.names[name])


CONFIG_SPELLING = LayoutSpelling({field.name: f"parallel.{field.name}" for field in dataclasses.fields(ParallelConfig)})


def layout_errors(
    parallel: ParallelConfig, world_size: int, model_facts: ModelFacts, spelling: LayoutSpelling = CONFIG_SPELLING
) -> list[str]:
    """What keeps ``parallel`` from running ``model_facts``' model on ``world_size`` processes, one
    message per problem, each naming the fields (as ``spelling`` writes them), the values and a fix."""
    tp, pp, cp, vpp = parallel.tensor, parallel.pipeline, parallel.context, parallel.virtual_pipeline
    ep, etp = parallel.expert, parallel.expert_tensor_size
    name, setting = spelling.field, spelling.setting
    errors = []
    model_parallel = parallel.model_parallel()
    if world_size % model_parallel:
        errors.append(
            f"world size ({world_size}) must be TP x PP x CP x DP, but {name('tensor')} ({tp}) x "
            f"{name('pipeline')} ({pp}) x {name('context')} ({cp}) = {model_parallel} does not divide it: "
            f"run a multiple of {model_parallel} processes or change the layout"
        )
    heads, groups = model_facts.num_attention_heads, model_facts.num_query_groups
    if heads % tp:
        errors.append(f"{name('tensor')} ({tp}) must divide the model's attention heads ({heads}): set {spelling.names['tensor']} to {_one_of(_divisors(heads))}")
    if groups % tp and tp % groups:
        # megatron-core splits the key/value heads over the TP ranks, or, with fewer of them than
        # ranks, gives each one to TP / groups ranks.
        fitting = [size for size in _divisors(heads) if groups % size == 0 or size % groups == 0]
        errors.append(
            f"{name('tensor')} ({tp}) and the model's query groups (num_key_value_heads, {groups}) must divide one "
            f"another: set {spelling.names['tensor']} to {_one_of(fitting)}"
        )
    if model_facts.num_experts == 0:
        if ep > 1:
            errors.append(f"{name('expert')} ({ep}) > 1 needs an MoE model, but the model is dense: set {setting('expert', 1)}")
        if parallel.expert_tensor is not None:
            errors.append(f"{name('expert_tensor')} ({parallel.expert_tensor}) is set but the model is dense: {spelling.unsetting('expert_tensor')}")
    else:
        if model_facts.num_experts % ep:
            errors.append(
                f"{name('expert')} ({ep}) must divide the model's experts ({model_facts.num_experts}): "
                f"set {spelling.names['expert']} to {_one_of(_divisors(model_facts.num_experts))}"
            )
        if world_size % (ep * etp * pp):
            errors.append(
                f"{name('expert')} ({ep}) x expert tensor parallel ({etp}) x {name('pipeline')} ({pp}) = "
                f"{ep * etp * pp} must divide the world size ({world_size}): each stage's experts are spread over its "
                f"TP x CP x DP ranks; run {parallel.min_world_size()} processes (or a multiple) or lower {spelling.names['expert']}"
            )
        if tp > 1 and not parallel.sequence_parallel:
            errors.append(
                f"{name('tensor')} ({tp}) > 1 on an MoE model needs {name('sequence_parallel')} (Megatron's MoE "
                f"layer refuses to train without it): set {setting('sequence_parallel', 'true')}"
            )
        if etp != tp and ep == 1:
            errors.append(
                f"{name('expert_tensor')} ({etp}) != {name('tensor')} ({tp}) needs {name('expert')} > 1 (with "
                f"EP = 1 megatron-core 0.16 reduces expert gradients over the dense data-parallel group only): "
                f"{spelling.unsetting('expert_tensor')} or raise {spelling.names['expert']}"
            )
    if model_facts.num_layers % pp:
        errors.append(
            f"{name('pipeline')} ({pp}) must divide the model's layers ({model_facts.num_layers}): "
            f"set {spelling.names['pipeline']} to {_one_of(_divisors(model_facts.num_layers))}"
        )
    if vpp is not None and pp == 1:
        errors.append(
            f"{name('virtual_pipeline')} ({vpp}) needs {name('pipeline')} > 1: {spelling.unsetting('virtual_pipeline')} "
            f"or raise {spelling.names['pipeline']}"
        )
    elif vpp is not None and model_facts.num_layers % pp == 0 and model_facts.num_layers % (pp * vpp):
        errors.append(
            f"{name('pipeline')} ({pp}) x {name('virtual_pipeline')} ({vpp}) = {pp * vpp} must divide the model's "
            f"layers ({model_facts.num_layers}): set {spelling.names['virtual_pipeline']} to {_one_of(_divisors(model_facts.num_layers // pp))}"
        )
    if parallel.sequence_parallel and tp == 1:
        errors.append(
            f"{name('sequence_parallel')} needs {name('tensor')} > 1: set {setting('sequence_parallel', 'false')} or raise {spelling.names['tensor']}"
        )
    return errors


def _rollout_layout_errors(config: Config, model_facts: ModelFacts) -> list[str]:
    heads = model_facts.num_attention_heads
    if heads % config.rollout.engine_tensor_parallel:
        return [
            f"`rollout.engine_tensor_parallel` ({config.rollout.engine_tensor_parallel}) must divide the model's attention "
            f"heads ({heads}): set it to {_one_of(_divisors(heads))}"
        ]
    return []


def _sequence_errors(config: Config, model_facts: ModelFacts) -> list[str]:
    data, cp = config.data, config.parallel.context
    sequence = data.max_prompt_length + data.max_response_length
    lengths = f"`data.max_prompt_length` + `data.max_response_length` ({data.max_prompt_length} + {data.max_response_length} = {sequence})"
    errors = []
    if cp > 1 and sequence % (2 * cp):
        padded = -(-sequence // (2 * cp)) * 2 * cp
        errors.append(
            f"{lengths} must be divisible by 2 x `parallel.context` ({2 * cp}): each CP rank holds two load-balanced "
            f"chunks; raise data.max_prompt_length by {padded - sequence}"
        )
    if sequence > model_facts.max_position_embeddings:
        errors.append(
            f"{lengths} exceeds the model's max_position_embeddings ({model_facts.max_position_embeddings}): lower them"
        )
    if config.train.dynamic_batch and config.train.max_tokens_per_micro_batch < sequence:
        errors.append(
            f"`train.max_tokens_per_micro_batch` ({config.train.max_tokens_per_micro_batch}) must hold one full sequence, "
            f"{lengths}: set it to at least {sequence}"
        )
    out_of_vocab = [token for token in config.rollout.stop_token_ids if token >= model_facts.vocab_size]
    if out_of_vocab:
        errors.append(f"`rollout.stop_token_ids` {out_of_vocab} are outside the model's vocabulary (size {model_facts.vocab_size}): remove them")
    algorithm = config.algorithm
    if algorithm.overlong_penalty and algorithm.overlong_buffer_length > data.max_response_length:
        errors.append(
            f"`algorithm.overlong_buffer_length` ({algorithm.overlong_buffer_length}) must be <= `data.max_response_length` "
            f"({data.max_response_length}): the penalty ramps over the last tokens before the limit"
        )
    return errors


def _steps_named(train: TrainConfig) -> str:
    """``train.steps`` as an error names it, with the epochs it was resolved from."""
    origin = f", from train.total_epochs = {train.total_epochs}" if train.total_epochs is not None else ""
    return f"`train.steps` ({train.steps}{origin})"


def _batch_errors(config: Config, data_parallel: int) -> list[str]:
    train, rollout, algorithm = config.train, config.rollout, config.algorithm
    group = rollout.n_samples_per_prompt
    errors = []
    round_size = rollout.batch_size * group
    if train.global_batch_size < round_size:
        errors.append(
            f"`train.global_batch_size` ({train.global_batch_size}) must be >= `rollout.batch_size` ({rollout.batch_size}) x "
            f"`rollout.n_samples_per_prompt` ({group}) = {round_size}: the train batch holds at least one rollout round; "
            f"raise train.global_batch_size to {round_size} or lower rollout.batch_size"
        )
    if train.global_batch_size % group:
        errors.append(
            f"`train.global_batch_size` ({train.global_batch_size}) must be a multiple of `rollout.n_samples_per_prompt` "
            f"({group}) so that it holds whole groups: set it to {-(-train.global_batch_size // group) * group}"
        )
    if train.global_batch_size % train.mini_batch_size:
        fitting = [size for size in _divisors(train.global_batch_size) if size % data_parallel == 0]
        fix = f"set train.mini_batch_size to {_one_of(fitting[-4:])}" if fitting else f"make train.global_batch_size a multiple of DP ({data_parallel})"
        errors.append(
            f"`train.mini_batch_size` ({train.mini_batch_size}) must divide `train.global_batch_size` ({train.global_batch_size}): {fix}"
        )
    if train.mini_batch_size % data_parallel:
        errors.append(
            f"`train.mini_batch_size` ({train.mini_batch_size}) must be divisible by data parallel ({data_parallel}): "
            f"each rank trains mini_batch_size / DP samples; set it to a multiple of {data_parallel}"
        )
    elif not train.dynamic_batch and train.mini_batch_size % (train.micro_batch_size * data_parallel):
        errors.append(
            f"`train.micro_batch_size` ({train.micro_batch_size}) x data parallel ({data_parallel}) = "
            f"{train.micro_batch_size * data_parallel} must divide `train.mini_batch_size` ({train.mini_batch_size}): "
            f"set train.micro_batch_size to {_one_of(_divisors(train.mini_batch_size // data_parallel))}"
        )
    if group < 2:
        reasons = []
        if algorithm.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline"):
            reasons.append(f"`algorithm.advantage_estimator` ({algorithm.advantage_estimator}) compares the samples of a prompt")
        if algorithm.reward_norm == "group":
            reasons.append("`algorithm.reward_norm` (group) normalises within each prompt's samples")
        if algorithm.dynamic_sampling:
            reasons.append("`algorithm.dynamic_sampling` drops groups whose scores are all equal")
        errors += [f"{reason}: `rollout.n_samples_per_prompt` ({group}) must be >= 2" for reason in reasons]
    if train.eval_every and not config.data.val_files:
        errors.append(f"`train.eval_every` ({train.eval_every}) needs `data.val_files`: list validation files or set train.eval_every=0")
    return errors


def _critic_errors(config: Config) -> list[str]:
    critic, estimator = config.critic, config.algorithm.advantage_estimator
    if config.critic_enabled:
        if config.train.steps is not None and critic.warmup_steps >= config.train.steps:
            return [f"`critic.warmup_steps` ({critic.warmup_steps}) must be < {_steps_named(config.train)}: otherwise the policy never trains"]
        return []
    unused = []
    if critic.path is not None:
        unused.append("`critic.path`")
    if critic.warmup_steps:
        unused.append("`critic.warmup_steps`")
    if unused:
        return [
            f"{' and '.join(unused)} set but `algorithm.advantage_estimator` ({estimator}) trains no critic: "
            f"remove them or set algorithm.advantage_estimator=gae"
        ]
    return []


def resolve_steps(config: Config, num_prompts: int) -> int:
    """The run's RL steps: ``train.steps``, or, when it is null, ``train.total_epochs`` passes over
    the training prompts, each prompt trained on once per epoch::

        steps = total_epochs x ceil(num_prompts / prompts_per_step)
        prompts_per_step = train.global_batch_size // rollout.n_samples_per_prompt

    An epoch is nominal: with dynamic sampling a step rolls out more prompts than it trains on.

    Args:
        config: a loaded config.
        num_prompts: the usable training prompts (after length filtering and data.max_samples).

    Returns:
        The number of steps (logged when derived from the epochs).
    """
    train = config.train
    if train.steps is not None:
        return train.steps
    prompts_per_step = train.global_batch_size // config.rollout.n_samples_per_prompt
    steps = train.total_epochs * -(-num_prompts // prompts_per_step)
    log.info("train.total_epochs = %d: %d prompts, %d per step -> %d steps", train.total_epochs, num_prompts, prompts_per_step, steps)
    return steps


def validate(config: Config, world_size: int, model_facts: ModelFacts) -> None:
    """Check the config against itself, the model and the world size, before anything is built.

    With ``train.total_epochs`` the checks that need the run's length wait for :func:`resolve_steps`;
    call this again once it has set ``train.steps``.

    Args:
        config: a loaded config (each section already checked its own ranges).
        world_size: the number of training processes.
        model_facts: the policy model's dimensions (:meth:`ModelFacts.from_hf_dir`).

    Raises:
        ConfigError: listing every violation on its own line, each naming the fields, their values
            and the fix.
    """
    if world_size < 1:
        raise ConfigError(f"world size ({world_size}) must be >= 1")
    # A layout error is reported once; the batch checks then use the DP the layout would give.
    data_parallel = max(1, config.parallel.data_parallel(world_size))
    errors = (
        layout_errors(config.parallel, world_size, model_facts)
        + _rollout_layout_errors(config, model_facts)
        + _sequence_errors(config, model_facts)
        + _batch_errors(config, data_parallel)
        + _critic_errors(config)
    )
    if errors:
        raise ConfigError(f"invalid configuration for world size {world_size}:\n  - " + "\n  - ".join(errors))
