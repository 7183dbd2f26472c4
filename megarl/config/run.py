"""Where a run's outputs go: ``checkpoint`` and ``logging``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig(Section):
    """Saving and resuming."""

    dir: Optional[str] = None
    """Checkpoint root; null: ``<run dir>/checkpoints`` (verl: trainer.default_local_dir, slime: --save)."""
    save_every: Annotated[int, Range(ge=0)] = 0
    """Save every N RL steps; 0: only at the end (verl: trainer.save_freq, slime: --save-interval)."""
    keep_last: Annotated[int, Range(ge=1)] = 2
    """Committed checkpoints to keep (verl: trainer.max_actor_ckpt_to_keep)."""
    resume: str = "auto"
    """``auto``: the latest committed checkpoint if there is one; ``never``; or a checkpoint path
    (verl: trainer.resume_mode / resume_from_path, slime: --load)."""
    load_contents: Literal["all", "model"] = "all"
    """What a resume loads: ``all`` goes on where the checkpoint stopped (weights, optimizer state,
    LR schedule, step, data position, counters, RNG); ``model`` loads only the weights (the
    policy's, and the critic's with one) and starts a new run at step 0: fresh optimizer and
    schedule, the data from its start, the config's seeds; once that run has saved a checkpoint of
    its own, the same command goes on from it, whole (a restart does not start over). Needs
    ``resume`` to name the checkpoint (the weights' source, which ``auto`` cannot be) (verl:
    checkpoint.load_contents, a list of model / optimizer / extra; the mixes between these two would
    pair Adam's moments with a schedule at step 0, or a data position with weights that never saw it)."""
    save_hf: bool = False
    """Also export the final policy as a HF directory (OpenRLHF: --save_hf_ckpt)."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if not self.resume:
            yield "resume", "must be 'auto', 'never' or a checkpoint path"
        elif self.load_contents == "model" and self.resume in ("auto", "never"):
            yield "load_contents", (
                f"(model) starts a new run from a checkpoint's weights, so `checkpoint.resume` ({self.resume}) must name that checkpoint: "
                "set checkpoint.resume=<path>/step_NNNNNNNN (with auto a restart would start over from the same weights)"
            )


@dataclasses.dataclass(kw_only=True, slots=True)
class LoggingConfig(Section):
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
    log_every: Annotated[int, Range(ge=1)] = 1
    """Print the console line every N RL steps; metrics.jsonl, TensorBoard and W&B get every step
    (OpenRLHF: --logging_steps)."""
    console_metrics: list[str] = dataclasses.field(default_factory=list)
    """More metrics for the console line, by name (e.g. ``reward/length``, an extra number a reward
    function returns); metrics.jsonl has them all either way."""
    rollout_dir: Optional[str] = None
    """Save what each step trained on as ``<rollout_dir>/<step>.jsonl``, one JSON object per sample
    (prompt, response, score, reward extras, advantage, data source; README "Saved generations");
    a relative path is under the run directory; null: not saved (verl: trainer.rollout_data_dir)."""
    validation_dir: Optional[str] = None
    """Save every validation's samples as ``<validation_dir>/<step>.jsonl`` (the policy after step
    ``step``; ``-1``: the initial one), as rollout_dir does; a relative path is under the run
    directory; null: not saved (verl: trainer.validation_data_dir)."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if not self.name or "/" in self.name:
            yield "name", f"({self.name!r}) must be a non-empty name without '/'"
        if not self.run_dir:
            yield "run_dir", "must be a directory, e.g. runs/{name}"
        for field in ("rollout_dir", "validation_dir"):
            if getattr(self, field) == "":
                yield field, "must be a directory (relative: under the run directory) or null"

    def resolved_run_dir(self) -> Path:
        """``run_dir`` with ``{name}`` replaced by the run name."""
        return Path(self.run_dir.replace("{name}", self.name))

    def generations_dir(self, directory: str | None) -> Path | None:
        """``rollout_dir`` or ``validation_dir`` as a path: an absolute one as it is, a relative one
        under the run directory; None when it is null."""
        if directory is None:
            return None
        path = Path(directory)
        return path if path.is_absolute() else self.resolved_run_dir() / path
