"""Where a step's metrics go: the console, ``<run dir>/metrics.jsonl``, TensorBoard and W&B.

Only the first rank writes. Every step's metrics are appended to ``metrics.jsonl`` as one JSON
object (``{"step": N, "time": unix seconds, name: value, ...}``), whatever the other sinks, so a
run can be plotted or compared without any of them (:func:`read_rows` reads it back). The file
is strict JSON: a value that is not finite is written as the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` (``float()`` reads them back; so does pandas with ``df.astype(float)``).
TensorBoard (``tensorboard`` package) and W&B (``wandb``; ``logging.wandb_mode: offline`` needs
no network and writes under the run directory) are optional packages: asking for one that is not
installed fails at start-up with the package to install.

A resumed run goes on from the step after its checkpoint, so the steps a crashed run logged after
that checkpoint are logged again: :meth:`MetricsLogger.start` takes their rows out of
``metrics.jsonl`` (kept aside in ``metrics.jsonl.replaced-<unix time>``), purges them from
TensorBoard and resumes the same W&B run, so that every sink holds each step once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megarl.config import ConfigError, LoggingConfig

CONSOLE_METRICS = (
    ("reward/mean", "reward {:.3f}"),
    ("val/accuracy", "val_acc {:.3f}"),
    ("response/length_mean", "len {:.1f}"),
    ("policy/loss", "loss {:+.4f}"),
    ("policy/entropy", "entropy {:.3f}"),
    ("policy/approx_kl", "kl {:.2e}"),
    ("policy/grad_norm", "grad {:.3f}"),
    ("mismatch/logprob_diff_abs_mean", "mismatch {:.1e}"),
    ("throughput/samples_per_s", "{:.0f} samples/s"),
)
"""(metric, how the console line shows it) for the per-step console line, in order, when present;
the step's time and its phases (:func:`step_time`) follow them."""

STEP_PHASES = (
    ("time/rollout_s", "rollout"),
    ("time/forward_s", "forward"),
    ("time/update_s", "update"),
    ("weights/sync_s", "sync"),
)
"""The phases of a step (``time/step_s``), in order: (metric in seconds, name). The console line
splits the step's time into them; a run's summary and curves (:mod:`megarl.report`) show each
one's share."""


class MetricsLogger:
    """Writes each step's metrics to every configured sink (a no-op on ranks other than 0).

    Args:
        logging_config: the ``logging`` section: which sinks, the run's name, the console line.
        run_dir: the run directory.
        enabled: whether this process writes (rank 0).
        run_settings: what W&B records as the run's config: the whole resolved config
            (``Config.to_dict()``); None records nothing.
    """

    def __init__(self, logging_config: LoggingConfig, run_dir: Path, *, enabled: bool, run_settings: dict[str, Any] | None = None):
        self.enabled = enabled
        self.logging_config = logging_config
        self.run_dir = run_dir
        self.run_settings = run_settings
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        # The optional packages are checked now, so that a missing one fails before any training.
        problems = sink_problems(logging_config)
        if problems:
            raise ConfigError("; ".join(problems))

    def start(self, start_step: int) -> None:
        """Open the sinks for a run that goes on at ``start_step`` (0: a new run), dropping what
        they hold for that step and later ones."""
        if not self.enabled:
            return
        logging_config = self.logging_config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            _drop_rows_from(path, start_step)
        self._jsonl = open(path, "a", buffering=1)
        if logging_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step or None)
        if wandb_enabled(logging_config):
            import wandb

            id_file = self.run_dir / "wandb_run_id"
            if start_step > 0 and id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:16]
                id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=logging_config.wandb_project,
                name=logging_config.name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=logging_config.wandb_mode,
                config=self.run_settings,
                reinit="finish_previous",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (name -> number) for RL step ``step``."""
        if not self.enabled:
            return
        if self._jsonl is None:
            self.start(0)
        values = {name: _number(value) for name, value in metrics.items()}
        row = {"step": step, "time": round(time.time(), 3), **{name: json_number(value) for name, value in values.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self.logging_config.console and step % self.logging_config.log_every == 0:
            tqdm.write(console_line(step, values, self.logging_config.console_metrics))

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """A few samples of a generation file (:mod:`megarl.trainer.generations`; ``rows``: records
        with the same keys) as a table under ``name`` (``generations/rollout``): a ``wandb.Table``
        on W&B, a markdown table (``add_text``) on TensorBoard; nothing on other sinks. A nested
        value (the reward's extras) shows as its JSON."""
        if not self.enabled or not rows:
            return
        if self._jsonl is None:
            self.start(0)
        if self._tensorboard is None and self._wandb is None:
            return
        columns = list(rows[0])
        cells = [[value if isinstance(value, (int, float, str)) else json.dumps(value) for value in row.values()] for row in rows]
        if self._tensorboard is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in cells]
            self._tensorboard.add_text(name, "\n".join(lines), global_step=step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=cells)}, step=step)

    def close(self) -> None:
        if self._jsonl is None:
            return
        self._jsonl.close()
        self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_enabled(logging_config: LoggingConfig) -> bool:
    """W&B asked for and not disabled by its mode."""
    return logging_config.wandb and logging_config.wandb_mode != "disabled"


def sink_problems(logging_config: LoggingConfig) -> list[str]:
    """The optional packages the ``logging`` section asks for that are not installed, one line each
    (found without importing them)."""
    wanted = {"tensorboard": logging_config.tensorboard, "wandb": wandb_enabled(logging_config)}
    return [
        f"`logging.{package}` is true but the {package} package is not installed: pip install {package}, or set logging.{package}=false"
        for package, asked in wanted.items()
        if asked and importlib.util.find_spec(package) is None
    ]


def _drop_rows_from(path: Path, start_step: int) -> None:
    """Remove the rows of ``start_step`` and later steps (and a torn last line) from
    ``metrics.jsonl``, keeping the original beside it when anything is removed."""
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] < start_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) == len(lines):
        return
    os.replace(path, path.with_name(f"{path.name}.replaced-{int(time.time())}"))
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def console_line(step: int, values: dict[str, float], extra: list[str] = ()) -> str:
    """``step 12 | reward 0.531 | len 3.2 | ... | 412 samples/s | s/step 0.31 (rollout 0.12, ...)``
    with the :data:`CONSOLE_METRICS` and the step time present, then the ``extra`` metrics present
    (``logging.console_metrics``) under their own names."""
    present = {name: value for name, value in values.items() if not math.isnan(value)}
    parts = [f"step {step}"]
    parts += [form.format(present[name]) for name, form in CONSOLE_METRICS if name in present]
    if "time/step_s" in present:
        parts.append(step_time(present))
    parts += [f"{name} {present[name]:.4g}" for name in extra if name in present]
    return " | ".join(parts)


def step_time(values: dict[str, float]) -> str:
    """``s/step 0.31 (rollout 0.12, forward 0.05, update 0.12, sync 0.01)``: the step's seconds
    and those of each of its :data:`STEP_PHASES` present in ``values`` (no parentheses without
    any)."""
    phases = ", ".join(f"{label} {seconds(values[name])}" for name, label in STEP_PHASES if name in values)
    return f"s/step {seconds(values['time/step_s'])}" + (f" ({phases})" if phases else "")


def seconds(value: float) -> str:
    """A short time in seconds, compact on a console line: two decimals under a second (``0.31``),
    one from there on (``1.5``, ``12.0``)."""
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


class MetricsFileError(ValueError):
    """A ``metrics.jsonl`` that cannot be read as one: missing, empty, or a line that is not a row.
    The message names the file (and the line)."""


def read_rows(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl`` in file order, every value a float (``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"`` read back). A last line without its newline that does not
    parse is a row still being written, and is left out.

    Raises:
        MetricsFileError: the file cannot be read, holds no row, or a line is not a JSON object
            with a ``step`` and numbers.
    """
    try:
        text = path.read_text()
    except OSError as error:
        raise MetricsFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise MetricsFileError(f"{path}: not a metrics.jsonl (not text)") from None
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise MetricsFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise MetricsFileError(f"{path}:{number}: not a metrics row (a JSON object with a \"step\")")
        values = {}
        for name, value in row.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise MetricsFileError(f"{path}:{number}: {name!r} is not a number ({value!r})") from None
        rows.append(values)
    if not rows:
        raise MetricsFileError(f"{path}: no rows (the run logged no step)")
    return rows


def json_number(value: float) -> float | str:
    """``value`` as strict JSON allows: the number, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _markdown_cell(value: Any) -> str:
    """A table cell on one line: line breaks as ``<br>``, pipes escaped."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _number(value: Any) -> float:
    """A metric as a plain float (tensors and numpy scalars included)."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)
