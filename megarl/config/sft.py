"""The config of a supervised fine-tuning run (``python -m megarl.sft``): the sections of an RL run
that apply (``model``, ``parallel``, ``train``, ``checkpoint``, ``logging``) and ``data``, the chat
datasets.

In ``train`` a step is ``global_batch_size`` conversations, cut into mini-batches of
``mini_batch_size`` (one optimizer step each) and micro-batches as in RL; ``ppo_epochs`` passes
over each step's conversations; ``train.steps`` or ``train.total_epochs`` sets the run's length.
The RL-only fields of ``train`` (``eval_every``, ``val_before_train``, ``val_only``,
``val_pass_threshold``) and ``logging.rollout_dir`` / ``validation_dir`` are not read.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from megarl.config.base import ConfigError, Range, Section
from megarl.config.model import ModelConfig, ModelFacts, ParallelConfig, layout_errors
from megarl.config.root import RunRoot
from megarl.config.run import CheckpointConfig, LoggingConfig
from megarl.config.train import TrainConfig


@dataclasses.dataclass(kw_only=True, slots=True)
class SFTDataConfig(Section):
    """Chat datasets: one conversation a row, ``{"messages": [{"role": ..., "content": ...}, ...]}``."""

    train_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/sft.jsonl"])
    """Conversation datasets (jsonl); ``bundled:NAME`` is a file shipped in megarl/assets/data
    (verl: data.train_files)."""
    messages_key: str = "messages"
    """Row field holding the conversation, a list of ``{"role", "content"}`` messages with at least
    one ``assistant`` turn (verl: data.messages_key)."""
    max_length: Annotated[int, Range(ge=2)] = 512
    """Longest conversation in tokens, chat template included; a longer one is refused, naming its
    row (verl: data.max_length with data.truncation=error)."""
    shuffle: bool = True
    """Shuffle the conversations every epoch; false: file order (verl: data.shuffle)."""
    seed: int = 1
    """Seed of the epochs' orders."""


@dataclasses.dataclass(kw_only=True, slots=True)
class SFTConfig(RunRoot):
    """A whole supervised fine-tuning run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The model to fine-tune and how its layers are built (verl: model.partial_pretrain)."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """The training layout (TP, PP, VPP, CP, EP, ETP, SP); DP is derived from the world size."""
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    """The conversations and their length limit."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(optimizer=dataclasses.replace(TrainConfig().optimizer, lr=1e-5)))
    """Batch sizes, optimizer (verl: optim.lr, default 1e-5 here), schedule, packing."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming, in the RL checkpoints' format."""
    logging: LoggingConfig = dataclasses.field(default_factory=lambda: LoggingConfig(name="megarl_sft"))
    """Metrics sinks and the run directory."""


def validate_sft(config: SFTConfig, world_size: int, model_facts: ModelFacts) -> None:
    """Check the layout against the model and the world size, and the batch sizes against the
    data-parallel size, before anything is built.

    Raises:
        ConfigError: listing every violation on its own line, with its fix.
    """
    train, data_parallel = config.train, max(1, config.parallel.data_parallel(world_size))
    errors = layout_errors(config.parallel, world_size, model_facts)
    if train.global_batch_size % train.mini_batch_size:
        errors.append(
            f"`train.mini_batch_size` ({train.mini_batch_size}) must divide `train.global_batch_size` ({train.global_batch_size}): "
            f"change one of them"
        )
    if train.mini_batch_size % data_parallel:
        errors.append(f"`train.mini_batch_size` ({train.mini_batch_size}) must be divisible by data parallel ({data_parallel})")
    elif not train.dynamic_batch and train.mini_batch_size % (train.micro_batch_size * data_parallel):
        errors.append(
            f"`train.micro_batch_size` ({train.micro_batch_size}) x data parallel ({data_parallel}) must divide "
            f"`train.mini_batch_size` ({train.mini_batch_size}): lower train.micro_batch_size"
        )
    if config.data.max_length > model_facts.max_position_embeddings:
        errors.append(
            f"`data.max_length` ({config.data.max_length}) exceeds the model's max_position_embeddings "
            f"({model_facts.max_position_embeddings}): lower it"
        )
    if train.dynamic_batch and train.max_tokens_per_micro_batch < config.data.max_length:
        errors.append(
            f"`train.max_tokens_per_micro_batch` ({train.max_tokens_per_micro_batch}) must hold one conversation of "
            f"`data.max_length` ({config.data.max_length}) tokens: raise it"
        )
    if errors:
        raise ConfigError(f"invalid configuration for world size {world_size}:\n  - " + "\n  - ".join(errors))
