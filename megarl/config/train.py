"""The policy update (``train`` with its ``optimizer``) and the value model (``critic``), and the
run's length in steps once the data is counted (:func:`resolve_steps`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal, Optional

from megarl.config.base import ConfigError, Range, Section

if TYPE_CHECKING:
    from megarl.config.root import Config

log = logging.getLogger("megarl.config")


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimizerConfig(Section):
    """Adam settings, shared by the policy (``train.optimizer``) and the critic (``critic.optimizer``)."""

    lr: Annotated[float, Range(gt=0)] = 1e-6
    """Peak learning rate (verl: actor.optim.lr, slime: --lr)."""
    min_lr: Annotated[float, Range(ge=0)] = 0.0
    """Learning rate at the end of linear or cosine decay, in [0, lr] (slime: --min-lr)."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    """Decoupled (AdamW) weight decay (verl: optim.weight_decay, slime: --weight-decay)."""
    adam_beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """Adam beta1 (slime: --adam-beta1)."""
    adam_beta2: Annotated[float, Range(ge=0, lt=1)] = 0.999
    """Adam beta2 (slime: --adam-beta2)."""
    adam_eps: Annotated[float, Range(gt=0)] = 1e-8
    """Adam epsilon (slime: --adam-eps)."""
    clip_grad: Annotated[float, Range(ge=0, note="0 disables clipping")] = 1.0
    """Gradient clipping by global norm; 0 disables it (verl: actor.grad_clip, slime: --clip-grad)."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        # Against a valid lr only: an lr <= 0 is reported on its own.
        if self.lr > 0 and self.min_lr > self.lr:
            yield "min_lr", f"({self.min_lr}) must be in [0, lr] = [0, {self.lr}]"


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig(Section):
    """The policy update: RL steps, the batch hierarchy, optimizer and schedule."""

    steps: Annotated[Optional[int], Range(ge=1)] = 200
    """RL steps to run; a step rolls out, scores and trains on one train batch; null: from
    total_epochs (verl: trainer.total_training_steps, slime: --num-rollout)."""
    total_epochs: Annotated[Optional[int], Range(ge=1)] = None
    """Passes over the training prompts, instead of steps (which must then be null): once the data
    is loaded the run takes total_epochs x ceil(prompts / (global_batch_size / n_samples_per_prompt))
    steps, the prompts a step trains on (verl: trainer.total_epochs, slime: --num-epoch, OpenRLHF:
    --num_episodes)."""
    global_batch_size: Annotated[int, Range(ge=1)] = 128
    """Samples (prompt + response) trained on per RL step: the train batch. It holds at least one
    rollout round (rollout.batch_size x n_samples_per_prompt) and whole groups; the step rolls out
    rounds until it is full (LightRFT: --train_batch_size)."""
    mini_batch_size: Annotated[int, Range(ge=1)] = 64
    """Samples per optimizer step (verl: actor.ppo_mini_batch_size x rollout.n, slime:
    --global-batch-size)."""
    micro_batch_size: Annotated[int, Range(ge=1)] = 8
    """Samples per forward/backward on each data-parallel rank (verl: ppo_micro_batch_size_per_gpu,
    slime: --micro-batch-size)."""
    dynamic_batch: bool = False
    """Fill micro-batches up to max_tokens_per_micro_batch tokens instead of micro_batch_size samples
    (verl: actor.use_dynamic_bsz, slime: --use-dynamic-batch-size)."""
    max_tokens_per_micro_batch: Annotated[int, Range(ge=1)] = 4096
    """Token budget of one dynamic micro-batch on each data-parallel rank: with packing its samples'
    tokens (each rounded up to the layout's multiple, 2 x CP with context parallelism) and the pack's
    tail; without, padding included (samples x the longest one's length) (verl:
    ppo_max_token_len_per_gpu, slime: --max-tokens-per-gpu)."""
    forward_micro_batch_size: Annotated[Optional[int], Range(ge=1)] = None
    """Samples per micro-batch of the passes without gradients on each data-parallel rank: old and
    reference log-probs, the critic's values, a Megatron teacher's log-probs. They keep no
    activations for a backward, so they can take more than the update's; null: micro_batch_size
    (verl: rollout.log_prob_micro_batch_size_per_gpu, ref.log_prob_micro_batch_size_per_gpu,
    critic.forward_micro_batch_size_per_gpu)."""
    forward_max_tokens_per_micro_batch: Annotated[Optional[int], Range(ge=1)] = None
    """With dynamic_batch, the token budget of a micro-batch of those passes, counted as
    max_tokens_per_micro_batch is; null: max_tokens_per_micro_batch (verl:
    rollout.log_prob_max_token_len_per_gpu, ref.log_prob_max_token_len_per_gpu,
    critic.forward_max_token_len_per_gpu)."""
    packing: bool = True
    """Concatenate a micro-batch's samples without padding (THD, one sequence with per-sample
    bounds: attention never crosses a sample, positions restart per sample) instead of padding each
    to the longest; the same loss and gradients, less compute and memory; false: padded (verl:
    model.use_remove_padding, NeMo-RL: sequence_packing.enabled, OpenRLHF: --packing_samples)."""
    balance_batch: bool = True
    """With packing, partition samples over data-parallel ranks and into micro-batches by the
    Karmarkar-Karp method so that their tokens (then their attention cost) are even; false: by
    length order, as without packing (verl: trainer.balance_batch)."""
    ppo_epochs: Annotated[int, Range(ge=1)] = 1
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
    lr_warmup_steps: Annotated[int, Range(ge=0)] = 0
    """Optimizer steps of linear warm-up from 0 to optimizer.lr; a run with fewer optimizer steps
    warms up over all of them (with a warning) (slime: --lr-warmup-iters, verl: optim.lr_warmup_steps)."""
    lr_warmup_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Warm-up as a fraction of the run's optimizer steps, in [0, 1), instead of lr_warmup_steps
    (verl: optim.lr_warmup_steps_ratio)."""
    use_distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (Megatron/slime: --use-distributed-optimizer)."""
    offload: list[Literal["params", "grads", "optimizer"]] = dataclasses.field(default_factory=list)
    """State of the policy and the critic moved to host memory while the colocated engines
    generate: after each weight sync (and before the first rollout) until the step's forward
    passes (:mod:`megarl.trainer.offload`): ``params`` (the DDP parameter buffers), ``grads``
    (the gradient buffers, zeros between steps: released, not copied), ``optimizer`` (fp32 main
    parameters and Adam moments, this rank's shard with the distributed optimizer). Needs
    rollout.colocate; the same training bit for bit (verl: actor.megatron.param_offload,
    grad_offload, optimizer_offload; OpenRLHF: --deepspeed_enable_sleep; slime: --offload-train)."""
    max_consecutive_nan_steps: Annotated[int, Range(ge=1)] = 3
    """Optimizer steps with a NaN/inf gradient are skipped; this many in a row stop the run."""
    eval_every: Annotated[int, Range(ge=0)] = 10
    """Validate after every N RL steps (after steps N-1, 2N-1, ... counting from 0) and after the
    last; 0: never (verl: trainer.test_freq, slime: --eval-interval)."""
    val_before_train: bool = False
    """Also validate the initial policy before the first step (verl: trainer.val_before_train); its
    metrics are logged with the first step, each name with ``_before_train`` appended
    (``val/accuracy_before_train``, ``val/<source>/accuracy_before_train``, ...)."""
    val_only: bool = False
    """Validate the policy (the checkpoint checkpoint.resume finds, else the initial weights), log
    the metrics as the row of the step the run would train next, and stop without training
    (verl: trainer.val_only)."""
    val_pass_threshold: float = 1.0
    """A validation sample counts as correct for pass@k when its score is at least this. 1.0 fits
    rule rewards that give 1 for a right answer, whether a wrong one scores 0, -1 or a small
    format credit (megarl's rules, verl's math rewards, DAPO's -1/1)."""
    seed: int = 42
    """Seed of batch shuffling between mini-batches."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if len(set(self.offload)) != len(self.offload):
            yield "offload", f"({self.offload}) names a choice twice: list each of params, grads, optimizer at most once"
        if self.lr_warmup_ratio and self.lr_warmup_steps:
            yield "lr_warmup_ratio", (
                f"({self.lr_warmup_ratio}) and `train.lr_warmup_steps` ({self.lr_warmup_steps}) both set the warm-up: "
                f"set train.lr_warmup_steps=0 to use the ratio, or drop train.lr_warmup_ratio"
            )
        if self.steps is not None and self.total_epochs is not None:
            yield "total_epochs", (
                f"({self.total_epochs}) and `train.steps` ({self.steps}) both set the run's length: "
                f"set train.steps=null to train for epochs, or drop train.total_epochs"
            )
        if self.steps is None and self.total_epochs is None:
            yield "steps", (
                "and `train.total_epochs` are both null: set train.steps to the RL steps to run, or "
                "train.total_epochs to the passes over the training prompts"
            )

    def forward_only(self) -> TrainConfig:
        """This config with the forward-only passes' micro-batch size and token budget in place of
        the update's (each null one: the update's), for :func:`megarl.data.batching.plan_micro_batches`.
        A copy with the two fields set, not re-validated: a run counted in epochs has ``steps``
        resolved beside ``total_epochs`` (:func:`resolve_steps`), which a new config would refuse."""
        forward = copy.copy(self)
        forward.micro_batch_size = self.forward_micro_batch_size or self.micro_batch_size
        forward.max_tokens_per_micro_batch = self.forward_max_tokens_per_micro_batch or self.max_tokens_per_micro_batch
        return forward

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
class CriticConfig(Section):
    """The value model, trained when ``algorithm.advantage_estimator`` is gae (:attr:`Config.critic_enabled`)."""

    path: Optional[str] = None
    """Critic initialisation, a HF directory; null: the policy's weights with a fresh value head
    (verl: critic.model.path, OpenRLHF: --critic_pretrain)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    """Critic optimizer (verl: critic.optim, OpenRLHF: --critic_learning_rate)."""
    value_clip: Annotated[Optional[float], Range(gt=0)] = 0.5
    """Value-loss clipping around the old values; null disables it (verl: critic.cliprange_value)."""
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    """First RL steps that train only the critic (verl: trainer.critic_warmup)."""


def _steps_named(train: TrainConfig) -> str:
    """``train.steps`` as an error names it, with the epochs it was resolved from."""
    origin = f", from train.total_epochs = {train.total_epochs}" if train.total_epochs is not None else ""
    return f"`train.steps` ({train.steps}{origin})"


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
