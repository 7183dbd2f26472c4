"""megarl's configuration: nested dataclasses, the only place defaults live.

A run is one YAML file plus ``key.sub=value`` overrides::

    python -m megarl.config --config configs/moe_grpo.yaml train.steps=10 --print

Loading is strict: an unknown key is an error that names the nearest valid key, and every value is
checked against its field's type. :func:`validate` then checks the fields against each other and
against the model and the world size, before anything is built; every message names the fields,
their values and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_PREFIX = "bundled:"


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s), the value(s) and the fix."""


def resolve_model_path(path: str | Path) -> Path:
    """``bundled:NAME`` -> the bundled model directory ``megarl/assets/models/NAME``; other paths
    are returned as given."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return PACKAGE_DIR / "assets" / "models" / text[len(BUNDLED_PREFIX) :]
    return Path(text)


def resolve_data_path(path: str | Path) -> Path:
    """``bundled:NAME`` -> the bundled data file ``megarl/assets/data/NAME``; other paths as given."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return PACKAGE_DIR / "assets" / "data" / text[len(BUNDLED_PREFIX) :]
    return Path(text)


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"`{field}` {message}")


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str = "bundled:tiny-moe"
    """HF model directory to start from (config.json + safetensors); ``bundled:NAME`` names a bundled
    tiny model (verl: actor_rollout_ref.model.path, slime: --hf-checkpoint)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; None: the model directory."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and compute dtype. fp32 keeps CPU runs exact; bf16 on GPUs."""
    attention_backend: Literal["auto", "torch", "te"] = "auto"
    """Layer implementation: Transformer Engine's specs (``te``), portable torch specs (``torch``),
    or TE when it imports (``auto``)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Megatron's recompute_granularity)."""
    moe_grouped_gemm: bool = False
    """Grouped expert weights and GEMMs (needs TE or the grouped_gemm package on CUDA)."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """MoE token dispatcher (Megatron's moe_token_dispatcher_type)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss coefficient; 0 disables it (RL fine-tuning usually does)."""
    seed: int = 1234
    """Seed for model initialisation and Megatron's RNG tracker."""

    def __post_init__(self):
        _check(self.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", f"({self.moe_aux_loss_coeff}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tensor: int = 1
    """TP: ranks that split each layer's weights (Megatron tensor_model_parallel_size)."""
    pipeline: int = 1
    """PP: pipeline stages (pipeline_model_parallel_size)."""
    virtual_pipeline: Optional[int] = None
    """VPP: model chunks per pipeline stage (interleaved 1F1B); None for plain 1F1B."""
    context: int = 1
    """CP: ranks that split each sequence (context_parallel_size)."""
    expert: int = 1
    """EP: ranks that split the experts of each MoE layer (expert_model_parallel_size)."""
    expert_tensor: Optional[int] = None
    """ETP: ranks that split each expert's weights; None: the same as TP (Megatron's default)."""
    sequence_parallel: bool = False
    """SP: shard activations outside attention/MLP over the TP group (needs TP > 1)."""

    def __post_init__(self):
        for name in ("tensor", "pipeline", "context", "expert"):
            value = getattr(self, name)
            _check(value >= 1, f"parallel.{name}", f"({value}) must be >= 1")
        if self.virtual_pipeline is not None:
            _check(self.virtual_pipeline >= 1, "parallel.virtual_pipeline", f"({self.virtual_pipeline}) must be >= 1 or null")
        if self.expert_tensor is not None:
            _check(self.expert_tensor >= 1, "parallel.expert_tensor", f"({self.expert_tensor}) must be >= 1 or null")

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        """DP = world size / (TP x PP x CP)."""
        return world_size // self.model_parallel()

    def min_world_size(self) -> int:
        """The smallest world size this layout fits: a multiple of TP*PP*CP and of EP*ETP*PP."""
        multiple = self.model_parallel()
        expert = self.expert * self.expert_tensor_size * self.pipeline
        world = multiple
        while world % expert:
            world += multiple
        return world


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    train_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/train.jsonl"])
    """Prompt datasets (jsonl, json or parquet); ``bundled:NAME`` names a bundled file
    (verl: data.train_files, slime: --prompt-data)."""
    val_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/val.jsonl"])
    """Validation datasets (verl: data.val_files)."""
    prompt_key: str = "prompt"
    """Row field holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Row field holding the reference answer the reward checks."""
    apply_chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template."""
    max_prompt_length: int = 64
    """Prompt tokens at most (verl: data.max_prompt_length)."""
    max_response_length: int = 16
    """Generated tokens at most (verl: data.max_response_length, slime: --rollout-max-response-len)."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than max_prompt_length instead of failing."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch."""
    seed: int = 1
    """Shuffling seed."""

    def __post_init__(self):
        _check(bool(self.train_files), "data.train_files", "must list at least one file")
        _check(self.max_prompt_length >= 1, "data.max_prompt_length", f"({self.max_prompt_length}) must be >= 1")
        _check(self.max_response_length >= 1, "data.max_response_length", f"({self.max_response_length}) must be >= 1")


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutConfig:
    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Rollout engine: SGLang on GPUs, the embedded transformers engine (``hf``) anywhere; ``auto``
    picks sglang when CUDA and sglang are available, else hf."""
    num_engines: int = 1
    """Engine processes (each serves engine_tensor_parallel GPUs)."""
    engine_tensor_parallel: int = 1
    """Tensor parallel size inside each engine (verl: rollout.tensor_model_parallel_size,
    slime: --rollout-num-gpus-per-engine)."""
    batch_size: int = 16
    """Prompts per rollout round (verl: data.train_batch_size, slime: --rollout-batch-size)."""
    n_samples_per_prompt: int = 8
    """Responses sampled per prompt: the GRPO group size (verl: rollout.n, slime: --n-samples-per-prompt)."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the trainer's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 disables it."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Extra token ids that end a response (EOS always does)."""
    mem_fraction: float = 0.5
    """GPU memory fraction SGLang may use for weights and KV cache (mem_fraction_static)."""
    colocate: bool = True
    """Engines share the training GPUs, releasing memory during the update."""
    weight_transport: Literal["tensor", "nccl", "disk"] = "tensor"
    """How new weights reach the engines: same-host tensor handles, an NCCL group, or safetensors."""
    bucket_mb: int = 512
    """Largest weight-update bucket, MiB. 512 MiB is the measured knee (docs/benchmarks.md)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """Connect to running engines at these URLs instead of launching them."""
    request_timeout_s: float = 600.0
    """Timeout of one engine request, seconds."""
    health_check_interval_s: float = 10.0
    """Seconds between engine health checks."""
    restart_budget: int = 3
    """Engine restarts allowed before the run stops."""
    val_temperature: float = 0.0
    """Sampling temperature for validation (0: greedy)."""
    val_n_samples: int = 1
    """Responses per validation prompt."""
    seed: int = 1
    """Sampling seed."""

    def __post_init__(self):
        for name in ("num_engines", "engine_tensor_parallel", "batch_size", "n_samples_per_prompt", "bucket_mb", "val_n_samples"):
            value = getattr(self, name)
            _check(value >= 1, f"rollout.{name}", f"({value}) must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", f"({self.temperature}) must be > 0")
        _check(self.val_temperature >= 0, "rollout.val_temperature", f"({self.val_temperature}) must be >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", f"({self.top_p}) must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", f"({self.top_k}) must be -1 (off) or >= 1")
        _check(0 < self.mem_fraction < 1, "rollout.mem_fraction", f"({self.mem_fraction}) must be in (0, 1)")
        _check(self.request_timeout_s > 0, "rollout.request_timeout_s", f"({self.request_timeout_s}) must be > 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    advantage_estimator: Literal["grpo", "gae", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """How advantages are computed (verl: algorithm.adv_estimator)."""
    gamma: float = 1.0
    """Discount factor (gae, reinforce_pp)."""
    lam: float = 1.0
    """GAE lambda."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's std; False is Dr. GRPO (verl: norm_adv_by_std_in_grpo)."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """Policy objective: token-level PPO clip, GSPO (sequence ratio) or CISPO."""
    clip_ratio_low: float = 0.2
    """PPO clip below 1 (ratio >= 1 - clip_ratio_low)."""
    clip_ratio_high: float = 0.2
    """PPO clip above 1; larger than clip_ratio_low is DAPO's clip-higher."""
    clip_ratio_c: Optional[float] = None
    """Dual-clip bound for negative advantages (e.g. 3.0); None disables it."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are aggregated (verl: actor.loss_agg_mode)."""
    entropy_coeff: float = 0.0
    """Entropy bonus coefficient."""
    use_kl_in_reward: bool = False
    """Subtract a KL penalty from the token rewards (verl: algorithm.use_kl_in_reward)."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    """KL estimator for the reward penalty."""
    kl_ctrl: Literal["fixed", "adaptive"] = "fixed"
    """KL coefficient controller for the reward penalty."""
    kl_coef: float = 0.001
    """KL coefficient (initial value when adaptive)."""
    kl_target: float = 0.1
    """Adaptive controller: target KL."""
    kl_horizon: int = 10000
    """Adaptive controller: horizon, samples."""
    use_kl_loss: bool = False
    """Add KL to the reference policy as a loss term (verl: actor.use_kl_loss)."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss term."""
    kl_loss_estimator: Literal["k1", "k2", "k3", "abs"] = "k3"
    """KL estimator of the loss term (k3 = low_var_kl)."""
    tis: bool = False
    """Truncated importance sampling against the rollout engine's log-probs."""
    tis_threshold_low: float = 0.0
    """TIS: lower bound of the weight."""
    tis_threshold_high: float = 2.0
    """TIS: upper bound (truncation) of the weight."""
    icepop: bool = False
    """ICEPOP: mask tokens whose train/rollout ratio leaves [icepop_low, icepop_high]."""
    icepop_low: float = 0.5
    """ICEPOP lower ratio bound."""
    icepop_high: float = 2.0
    """ICEPOP upper ratio bound."""
    reward_clip: Optional[float] = None
    """Clip rewards to [-reward_clip, reward_clip]; None disables it."""
    reward_norm: Literal["none", "batch", "group", "running"] = "none"
    """Reward normalisation before the advantage estimator."""
    overlong_penalty: bool = False
    """DAPO soft overlong penalty."""
    overlong_buffer_length: int = 4
    """Tokens before the length limit where the penalty ramps up."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the length limit."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal."""
    dynamic_sampling_mean_range: Optional[list[float]] = None
    """Also drop groups whose mean reward is outside [low, high]."""
    filter_overlong: bool = False
    """Mask out responses cut at the length limit."""

    def __post_init__(self):
        _check(0 <= self.gamma <= 1, "algorithm.gamma", f"({self.gamma}) must be in [0, 1]")
        _check(0 <= self.lam <= 1, "algorithm.lam", f"({self.lam}) must be in [0, 1]")
        _check(0 <= self.clip_ratio_low < 1, "algorithm.clip_ratio_low", f"({self.clip_ratio_low}) must be in [0, 1)")
        _check(self.clip_ratio_high >= 0, "algorithm.clip_ratio_high", f"({self.clip_ratio_high}) must be >= 0")
        if self.clip_ratio_c is not None:
            _check(self.clip_ratio_c > 1, "algorithm.clip_ratio_c", f"({self.clip_ratio_c}) must be > 1 (or null)")
        _check(self.kl_coef >= 0 and self.kl_loss_coef >= 0, "algorithm.kl_coef", "and kl_loss_coef must be >= 0")
        _check(self.tis_threshold_low < self.tis_threshold_high, "algorithm.tis_threshold_low",
               f"({self.tis_threshold_low}) must be < algorithm.tis_threshold_high ({self.tis_threshold_high})")
        _check(self.icepop_low < self.icepop_high, "algorithm.icepop_low",
               f"({self.icepop_low}) must be < algorithm.icepop_high ({self.icepop_high})")
        if self.dynamic_sampling_mean_range is not None:
            low_high = self.dynamic_sampling_mean_range
            _check(len(low_high) == 2 and low_high[0] <= low_high[1], "algorithm.dynamic_sampling_mean_range",
                   f"({low_high}) must be [low, high] with low <= high")


@dataclasses.dataclass(kw_only=True, slots=True)
class RewardConfig:
    type: Literal["rule", "function", "remote", "model"] = "rule"
    """Where scores come from: a bundled rule, a user function, a remote URL or a reward model."""
    rule: Literal["toy", "math"] = "toy"
    """Bundled rule: the toy tasks' verifier or math answers via math-verify."""
    function: Optional[str] = None
    """User reward as ``path/to/file.py:name`` (type=function)."""
    url: Optional[str] = None
    """Remote reward endpoint (type=remote)."""
    model_path: Optional[str] = None
    """HF sequence-classification reward model (type=model)."""
    num_workers: int = 2
    """Reward worker processes."""
    timeout_s: float = 10.0
    """Per-sample timeout; a timeout scores 0 and is counted."""
    max_failure_rate: float = 0.5
    """Stop the run when more than this fraction of a batch fails to score."""
    remote_batch_size: int = 32
    """Samples per remote request."""
    remote_retries: int = 3
    """Retries of a failed remote request."""

    def __post_init__(self):
        _check(self.type != "function" or bool(self.function), "reward.function",
               "must be set (path/to/file.py:name) when reward.type is 'function'")
        _check(self.type != "remote" or bool(self.url), "reward.url", "must be set when reward.type is 'remote'")
        _check(self.type != "model" or bool(self.model_path), "reward.model_path", "must be set when reward.type is 'model'")
        _check(self.num_workers >= 1, "reward.num_workers", f"({self.num_workers}) must be >= 1")
        _check(self.timeout_s > 0, "reward.timeout_s", f"({self.timeout_s}) must be > 0")
        _check(0 <= self.max_failure_rate <= 1, "reward.max_failure_rate", f"({self.max_failure_rate}) must be in [0, 1]")


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of linear or cosine decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", f"({self.lr}) must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", f"({self.min_lr}) must be in [0, optimizer.lr = {self.lr}]")
        _check(self.clip_grad >= 0, "optimizer.clip_grad", f"({self.clip_grad}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 200
    """RL steps (rollout + update) to run."""
    global_batch_size: int = 128
    """Samples trained on per RL step (the train batch); it holds at least one rollout round."""
    mini_batch_size: int = 64
    """Samples per optimizer step (verl: ppo_mini_batch_size x n)."""
    micro_batch_size: int = 8
    """Samples per forward/backward on each data-parallel rank (verl: ppo_micro_batch_size_per_gpu)."""
    dynamic_batch: bool = False
    """Pack micro-batches up to max_tokens_per_micro_batch tokens instead of a fixed size."""
    max_tokens_per_micro_batch: int = 4096
    """Token budget of a dynamic micro-batch (verl: ppo_max_token_len_per_gpu)."""
    ppo_epochs: int = 1
    """Passes over each train batch."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Policy optimizer (Adam through Megatron's optimizer)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    max_consecutive_nan_steps: int = 3
    """Steps with a NaN/inf gradient are skipped; this many in a row stop the run."""
    eval_every: int = 10
    """Evaluate on the validation set every N steps (0: never)."""
    seed: int = 42
    """Training seed."""

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "mini_batch_size", "micro_batch_size", "max_tokens_per_micro_batch", "ppo_epochs", "max_consecutive_nan_steps"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", f"({value}) must be >= 1")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"({self.lr_warmup_steps}) must be >= 0")
        _check(self.eval_every >= 0, "train.eval_every", f"({self.eval_every}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class CriticConfig:
    path: Optional[str] = None
    """Critic initialisation (HF directory); None: the policy's weights with a fresh value head."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    """Critic optimizer."""
    value_clip: Optional[float] = 0.5
    """Value-loss clipping range around the old values; None disables it."""
    warmup_steps: int = 0
    """RL steps that train only the critic."""

    def __post_init__(self):
        _check(self.warmup_steps >= 0, "critic.warmup_steps", f"({self.warmup_steps}) must be >= 0")


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint root; None: ``<run dir>/checkpoints``."""
    save_every: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Committed checkpoints to keep."""
    resume: str = "auto"
    """``auto`` (latest committed checkpoint, if any), ``never``, or a checkpoint path."""
    save_hf: bool = False
    """Also export the final policy as a HF directory."""

    def __post_init__(self):
        _check(self.save_every >= 0, "checkpoint.save_every", f"({self.save_every}) must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"({self.keep_last}) must be >= 1")


@dataclasses.dataclass(kw_only=True, slots=True)
class LoggingConfig:
    name: str = "megarl"
    """Run name."""
    run_dir: Optional[str] = None
    """Where metrics.jsonl, the resolved config and checkpoints go; None: ``runs/<name>``."""
    console: bool = True
    """Print a line per step."""
    tensorboard: bool = False
    """Write TensorBoard events."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "megarl"
    """W&B project."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode; offline works without network."""
    log_every: int = 1
    """Log every N steps."""

    def __post_init__(self):
        _check(self.log_every >= 1, "logging.log_every", f"({self.log_every}) must be >= 1")


@dataclasses.dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The policy model."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """The training layout."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Prompts."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """Generation."""
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    """Advantages, losses, KL, filters."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """Scoring."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The update."""
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    """The value model (advantage_estimator = gae)."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Loading: YAML and overrides, strictly typed.


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[field.name]):
            keys += _all_keys(hints[field.name], key + ".")
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    """An error for ``key``, suggesting the valid key nearest to it: one with the same last part
    (``train.lr`` -> ``train.optimizer.lr``), else the closest spelling."""
    candidates = _all_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    nearest = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) or difflib.get_close_matches(
        key, candidates, n=1, cutoff=0.5
    )
    hint = f" — did you mean `{nearest[0]}`?" if nearest else ""
    return ConfigError(f"{source}: unknown key `{key}`{hint}")


def _qualify(error: ConfigError, prefix: str) -> str:
    """A ``__post_init__`` message names its field as ``section.field``; dataclasses shared by
    several sections (the optimizer) cannot know theirs, so the loader writes the full key."""
    message = str(error)
    if not message.startswith("`"):
        return message
    end = message.index("`", 1)
    leaf = message[1:end].rsplit(".", 1)[-1]
    return f"`{prefix}{leaf}`{message[end + 1:]}"


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation, key: str, source: str) -> Any:
    """``value`` checked and converted to ``annotation``; ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: `{key}` = {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be a list")
        return [_convert(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be a string")
        return value
    raise ConfigError(f"{source}: `{key}` has unsupported type {_type_name(annotation)}")


def _build(cls, values: dict[str, Any], prefix: str, source: str):
    """Instantiate dataclass ``cls`` from a nested dict, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or 'config'}` must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise _unknown_key(f"{prefix}{key}", source)
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            # Start from the section's own default (critic.optimizer's lr differs from the
            # optimizer class default), then apply what was given.
            default = fields[name].default_factory()
            if isinstance(value, dict):
                value = _deep_merge(dataclasses.asdict(default), value)
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.", source)
        elif isinstance(value, dict) and value:
            # A section given under a plain field: `train.steps.x=1`.
            raise _unknown_key(f"{prefix}{name}.{next(iter(value))}", source)
        else:
            kwargs[name] = _convert(value, annotation, f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {_qualify(error, prefix)}") from None


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge(base: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = base
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key(key, source)
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like key.sub=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override `{text}` has no key before '='")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or only defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrong type, or a value out of
            range; the message names the file or ``override`` and the field.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        values = loaded or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    for override in overrides:
        key, value = parse_override(override)
        _merge(values, key, value, f"override `{override}`")
    return _build(Config, values, "", "override" if path is None and overrides else source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# Cross-field validation.


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFacts:
    """The model dimensions validation needs, read from config.json alone."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int
    """0 for a dense model."""
    vocab_size: int
    max_position_embeddings: int

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelFacts:
        config_file = Path(path) / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"`model.path`: {config_file} does not exist; give a HF model directory") from None
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            num_experts=config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts") or 0,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 0),
        )


def validate(config: Config, world_size: int, facts: ModelFacts) -> None:
    """Check the config against itself, the model and the world size; raise one ConfigError that
    lists every violation, each with its fix."""
    errors: list[str] = []
    p, t, r = config.parallel, config.train, config.rollout
    tp, pp, cp, ep, etp = p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        errors.append(
            f"world size ({world_size}) must be TP x PP x CP x DP: `parallel.tensor` ({tp}) x "
            f"`parallel.pipeline` ({pp}) x `parallel.context` ({cp}) = {model_parallel} does not divide it; "
            f"change the layout or run {model_parallel * max(1, world_size // model_parallel)} processes"
        )
    dp = max(1, world_size // model_parallel)
    if facts.num_attention_heads % tp:
        errors.append(f"`parallel.tensor` ({tp}) must divide the attention heads ({facts.num_attention_heads})")
    if facts.num_query_groups % tp:
        errors.append(
            f"`parallel.tensor` ({tp}) must divide the query groups (num_key_value_heads = "
            f"{facts.num_query_groups}); choose a TP that divides {facts.num_query_groups}"
        )
    if facts.num_experts == 0:
        if ep > 1:
            errors.append(f"`parallel.expert` ({ep}) > 1 needs an MoE model; this model is dense: set parallel.expert=1")
        if p.expert_tensor is not None:
            errors.append("`parallel.expert_tensor` is set but the model is dense: remove it")
    else:
        if facts.num_experts % ep:
            errors.append(f"`parallel.expert` ({ep}) must divide the experts ({facts.num_experts})")
        if world_size % (ep * etp * pp):
            errors.append(
                f"`parallel.expert` ({ep}) x expert tensor parallel ({etp}) x `parallel.pipeline` ({pp}) = "
                f"{ep * etp * pp} must divide the world size ({world_size}): experts are spread over the "
                f"TP x CP x DP ranks of each stage ({tp * cp * dp})"
            )
        if tp > 1 and not p.sequence_parallel:
            errors.append(
                f"`parallel.tensor` ({tp}) > 1 on an MoE model needs `parallel.sequence_parallel`: "
                f"set parallel.sequence_parallel=true (Megatron requires it)"
            )
        if etp != tp and ep == 1:
            errors.append(
                f"`parallel.expert_tensor` ({etp}) != `parallel.tensor` ({tp}) needs `parallel.expert` > 1: "
                f"with EP = 1 megatron-core 0.16 reduces expert gradients over the dense data-parallel "
                f"group only; set parallel.expert_tensor=null or raise parallel.expert"
            )
    if facts.num_layers % pp:
        errors.append(f"`parallel.pipeline` ({pp}) must divide the layers ({facts.num_layers})")
    if p.virtual_pipeline is not None:
        if pp == 1:
            errors.append(f"`parallel.virtual_pipeline` ({p.virtual_pipeline}) needs `parallel.pipeline` > 1")
        elif facts.num_layers % (pp * p.virtual_pipeline):
            errors.append(
                f"`parallel.pipeline` ({pp}) x `parallel.virtual_pipeline` ({p.virtual_pipeline}) must "
                f"divide the layers ({facts.num_layers})"
            )
    if p.sequence_parallel and tp == 1:
        errors.append("`parallel.sequence_parallel` needs `parallel.tensor` > 1: set it to false or raise TP")
    sequence = config.data.max_prompt_length + config.data.max_response_length
    if cp > 1 and sequence % (2 * cp):
        errors.append(
            f"`data.max_prompt_length` + `data.max_response_length` ({sequence}) must be divisible by "
            f"2 x `parallel.context` ({2 * cp}): each CP rank holds two load-balanced chunks"
        )
    if facts.max_position_embeddings and sequence > facts.max_position_embeddings:
        errors.append(
            f"`data.max_prompt_length` + `data.max_response_length` ({sequence}) exceeds the model's "
            f"max_position_embeddings ({facts.max_position_embeddings})"
        )
    round_size = r.batch_size * r.n_samples_per_prompt
    if t.global_batch_size < round_size:
        errors.append(
            f"`train.global_batch_size` ({t.global_batch_size}) must be >= `rollout.batch_size` "
            f"({r.batch_size}) x `rollout.n_samples_per_prompt` ({r.n_samples_per_prompt}) = {round_size}: "
            f"the train batch holds at least one rollout round"
        )
    if t.global_batch_size % r.n_samples_per_prompt:
        errors.append(
            f"`train.global_batch_size` ({t.global_batch_size}) must be a multiple of "
            f"`rollout.n_samples_per_prompt` ({r.n_samples_per_prompt}) (whole groups)"
        )
    if t.global_batch_size % t.mini_batch_size:
        errors.append(
            f"`train.mini_batch_size` ({t.mini_batch_size}) must divide `train.global_batch_size` ({t.global_batch_size})"
        )
    if not t.dynamic_batch and t.mini_batch_size % (t.micro_batch_size * dp):
        fits = [m for m in range(1, t.mini_batch_size + 1) if t.mini_batch_size % (m * dp) == 0]
        errors.append(
            f"`train.micro_batch_size` ({t.micro_batch_size}) x data parallel ({dp}) = "
            f"{t.micro_batch_size * dp} must divide `train.mini_batch_size` ({t.mini_batch_size})"
            + (f": set train.micro_batch_size to one of {fits}" if fits else "")
        )
    if t.mini_batch_size % dp:
        errors.append(f"`train.mini_batch_size` ({t.mini_batch_size}) must be divisible by data parallel ({dp})")
    estimator = config.algorithm.advantage_estimator
    if estimator in ("grpo", "rloo", "reinforce_pp_baseline") and r.n_samples_per_prompt < 2:
        errors.append(
            f"`algorithm.advantage_estimator` = {estimator} compares samples of a prompt: "
            f"`rollout.n_samples_per_prompt` ({r.n_samples_per_prompt}) must be >= 2"
        )
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megarl.config", description="Resolve and check a megarl config.")
    parser.add_argument("--config", help="YAML file (omit for the defaults)")
    parser.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    parser.add_argument("--world-size", type=int, help="default: $WORLD_SIZE, else the layout's minimum")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or config.parallel.min_world_size()
        validate(config, world_size, ModelFacts.from_hf_dir(resolve_model_path(config.model.path)))
    except ConfigError as error:
        print(f"megarl.config: {error}", file=sys.stderr)
        return 2
    if args.print:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
