"""Where a step's metrics go: the console, ``<run dir>/metrics.jsonl``, TensorBoard and W&B.

Only the first rank writes. Every step's metrics are appended to ``metrics.jsonl`` as one JSON
object (``{"step": N, "time": unix seconds, name: value, ...}``), whatever the other sinks, so a
run can be plotted or compared without any of them. TensorBoard (``tensorboard`` package) and
W&B (``wandb``; ``logging.wandb_mode: offline`` needs no network and writes under the run
directory) are optional packages: asking for one that is not installed fails at start-up with
the package to install.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megarl.config import Config, ConfigError

CONSOLE_METRICS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("val/accuracy", "val_acc", "{:.3f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("policy/loss", "loss", "{:+.4f}"),
    ("policy/entropy", "entropy", "{:.3f}"),
    ("policy/approx_kl", "kl", "{:.2e}"),
    ("policy/grad_norm", "grad", "{:.3f}"),
    ("mismatch/logprob_diff_abs_mean", "mismatch", "{:.1e}"),
    ("time/step_s", "s/step", "{:.1f}"),
)
"""(metric, console label, format) shown on the per-step console line, in order, when present."""


class MetricsLogger:
    """Writes each step's metrics to every configured sink (a no-op on ranks other than 0).

    Args:
        config: the run's config (``logging`` section, and the whole config for W&B).
        run_dir: the run directory.
        enabled: whether this process writes (rank 0).
    """

    def __init__(self, config: Config, run_dir: Path, *, enabled: bool):
        self.enabled = enabled
        self.log_every = config.logging.log_every
        self.console = config.logging.console
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "`logging.tensorboard` is true but the tensorboard package is not installed: "
                    "pip install tensorboard, or set logging.tensorboard=false"
                ) from None
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config.logging.wandb and config.logging.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "`logging.wandb` is true but the wandb package is not installed: pip install wandb, "
                    "or set logging.wandb=false"
                ) from None
            self._wandb = wandb.init(
                project=config.logging.wandb_project,
                name=config.logging.name,
                dir=str(run_dir),
                mode=config.logging.wandb_mode,
                config=config.to_dict(),
                reinit="finish_previous",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (name -> number) for RL step ``step``."""
        if not self.enabled:
            return
        values = {name: _number(value) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self.console and step % self.log_every == 0:
            tqdm.write(console_line(step, values))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(step: int, values: dict[str, float]) -> str:
    """``step 12 | reward 0.531 | len 3.2 | ...`` with the :data:`CONSOLE_METRICS` present."""
    parts = [f"step {step}"]
    for name, label, form in CONSOLE_METRICS:
        if name in values and not math.isnan(values[name]):
            parts.append(f"{label} {form.format(values[name])}")
    return " | ".join(parts)


def _number(value: Any) -> float:
    """A metric as a plain float (tensors and numpy scalars included)."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)
