"""The whole config: one section per component.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megarl.config.agent import AgentConfig
from megarl.config.algorithm import AlgorithmConfig
from megarl.config.data import DataConfig
from megarl.config.model import ModelConfig, ParallelConfig
from megarl.config.reward import RewardConfig
from megarl.config.rollout import RolloutConfig
from megarl.config.run import CheckpointConfig, LoggingConfig
from megarl.config.teacher import TeacherConfig
from megarl.config.train import CriticConfig, TrainConfig

class RunRoot:
    """What the roots of a run's config (RL's :class:`Config`, SFT's ``SFTConfig``) share; each
    has ``checkpoint`` and ``logging`` sections."""

    __slots__ = ()

    def resolved_checkpoint_dir(self) -> Path:
        """``checkpoint.dir``, or ``<run dir>/checkpoints`` when it is null."""
        if self.checkpoint.dir is not None:
            return Path(self.checkpoint.dir)
        return self.logging.resolved_run_dir() / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain YAML-safe values (tuples become lists)."""
        return _plain(self)


@dataclasses.dataclass(kw_only=True, slots=True)
class Config(RunRoot):
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
    agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)
    """Multi-turn episodes: the environment, its tools and limits (null environment: single-turn)."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The policy update: batch sizes, optimizer, schedule."""
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    """The value model; trained only when algorithm.advantage_estimator is gae."""
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    """The on-policy distillation teacher (algorithm.use_opd): its model or its engines."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics sinks and the run directory."""

    @property
    def critic_enabled(self) -> bool:
        """Whether the run trains a critic: derived from the estimator (gae needs values)."""
        return self.algorithm.advantage_estimator == "gae"



def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
