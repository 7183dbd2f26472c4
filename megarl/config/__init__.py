"""megarl's configuration: nested dataclasses, the only place defaults live.

A run is one YAML file plus ``key.sub=value`` overrides::

    python -m megarl.config --config configs/moe_grpo.yaml train.steps=10 --print

Loading is strict (:mod:`~megarl.config.loader`): an unknown key is an error that names the nearest
valid key, and every value is checked against its field's type. Each section checks, when it is
built, the :class:`Range` declared on its numeric fields (``Annotated[float, Range(ge=0, le=1)]``)
and its own cross-field rules (its module: ``model``, ``data``, ``rollout``, ``algorithm``,
``reward``, ``train``, ``run``, ``teacher``; ``root`` gathers them); the loader reports every violation at once.
:func:`validate` (:mod:`~megarl.config.checks`) then checks the sections against each other, the
model and the world size before anything is built, and lists every violation with its fix.
"""

from __future__ import annotations

from megarl.config.agent import AgentConfig
from megarl.config.algorithm import AlgorithmConfig, KLEstimator
from megarl.config.base import (
    BUNDLED_PREFIX,
    ConfigError,
    FieldError,
    PACKAGE_DIR,
    Range,
    Section,
    did_you_mean,
    resolve_data_path,
    resolve_model_path,
)
from megarl.config.checks import validate
from megarl.config.data import DataConfig
from megarl.config.loader import load_config, parse_override, save_config
from megarl.config.model import CONFIG_SPELLING, DTYPE_NAMES, LayoutSpelling, ModelConfig, ModelFacts, ParallelConfig, layout_errors, layout_multiple, world_size_errors
from megarl.config.reward import RewardConfig
from megarl.config.rollout import RolloutConfig
from megarl.config.root import Config
from megarl.config.run import CheckpointConfig, LoggingConfig
from megarl.config.teacher import TeacherConfig
from megarl.config.train import CriticConfig, OptimizerConfig, TrainConfig, resolve_steps

__all__ = [
    "AgentConfig",
    "AlgorithmConfig",
    "BUNDLED_PREFIX",
    "CONFIG_SPELLING",
    "DTYPE_NAMES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CriticConfig",
    "DataConfig",
    "FieldError",
    "KLEstimator",
    "LayoutSpelling",
    "LoggingConfig",
    "ModelConfig",
    "ModelFacts",
    "OptimizerConfig",
    "PACKAGE_DIR",
    "ParallelConfig",
    "Range",
    "RewardConfig",
    "RolloutConfig",
    "Section",
    "TeacherConfig",
    "TrainConfig",
    "did_you_mean",
    "layout_errors",
    "layout_multiple",
    "load_config",
    "parse_override",
    "resolve_data_path",
    "resolve_model_path",
    "resolve_steps",
    "save_config",
    "validate",
    "world_size_errors",
]
