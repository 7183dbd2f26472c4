"""Where a run's outputs go: ``checkpoint`` and ``logging``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from megarl.config.base import _require

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
