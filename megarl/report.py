"""What a run shows a person when it ends: one summary line and a picture of its curves, both read
from ``metrics.jsonl`` (:func:`megarl.metrics.read_rows`).

- :func:`summary_line`: the steps run and their time from the launch, the time from the launch to
  the end of the first step (its row), the median step and where the step time went (each of
  :data:`~megarl.metrics.STEP_PHASES`' share of the summed step times), the mean reward of the
  last :data:`END_REWARD_STEPS` steps and the last validation accuracy.
- :func:`plot_runs`: the curves a person looks at first, for one run or several overlaid (a colour
  per run): reward with its :data:`SMOOTHING_STEPS`-step mean and validation accuracy, response
  length, entropy, KL and train/rollout mismatch (:data:`KL_METRICS`, log scale), then each run's
  step time stacked by phase. A panel whose metrics no run has says so instead of drawing.
- :func:`finish_run`: both at the end of training (:func:`megarl.trainer.loop.fit`, first rank):
  ``<run dir>/curves.png`` and the line that names it.

``tools/plot_run.py`` draws the same picture for any run directory or ``metrics.jsonl``, and
compares runs. matplotlib (Agg, no display) is imported when a picture is drawn, not with this
module, so that nothing before a run's first step waits for it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from megarl.metrics import STEP_PHASES, read_rows

PICTURE_NAME = "curves.png"
"""The picture a run leaves in its run directory."""

END_REWARD_STEPS = 20
"""The summary's reward: the mean ``reward/mean`` of this many last steps (as the README and
``tools/profile_step.py`` quote a run's end)."""

SMOOTHING_STEPS = 10
"""The reward panel's trailing mean, over this many steps (the "10-step mean reward" of issue 18's
time to 0.8)."""

KL_METRICS = ("policy/approx_kl", "policy/kl_loss", "kl/reward_kl", "mismatch/rollout_kl", "mismatch/logprob_diff_abs_mean")
"""The KL panel's metrics: the update's step size, the KL terms to the reference (as a loss, in the
reward), and how far the engine's log-probs are from the trainer's."""

KL_LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
"""One line style per :data:`KL_METRICS` entry (colours tell the runs apart)."""


def finish_run(run_dir: Path, *, launched_at: float, start_step: int) -> str:
    """Draw ``<run dir>/curves.png`` from the run's whole ``metrics.jsonl`` and return the summary
    line of the steps from ``start_step`` on (those of this launch), which names the picture."""
    rows = read_rows(run_dir / "metrics.jsonl")
    picture = plot_runs({run_dir.name: rows}, run_dir / PICTURE_NAME)
    return summary_line(rows, launched_at=launched_at, start_step=start_step, picture=picture)


def summary_line(rows: list[dict[str, float]], *, launched_at: float, start_step: int = 0, picture: Path | None = None) -> str:
    """One line on the steps from ``start_step`` on, e.g. ``training done: 200 steps in 2 min 33 s
    from launch | step 0 logged at 16.0 s | median step 0.64 s (rollout 52%, forward 16%, update
    38%, sync 2%) | reward 0.871 (mean of the last 20 steps) | val_acc 0.865 (step 199) | curves:
    runs/moe_grpo/curves.png``; a resumed run's (``start_step`` > 0) says so and counts from there.

    Args:
        rows: ``metrics.jsonl``'s rows (:func:`~megarl.metrics.read_rows`), at least one from
            ``start_step`` on; a row's ``time`` is the unix time it was logged, after its step
            and its validation.
        launched_at: unix time the command started (:attr:`megarl.trainer.run.Run.launched_at`).
        start_step: the first step of this launch (:attr:`megarl.trainer.run.Run.start_step`).
        picture: the curves' file, named at the end.
    """
    rows = [row for row in rows if row["step"] >= start_step]
    first, last = rows[0], rows[-1]
    resumed = f"resumed at step {start_step}, " if start_step else ""
    parts = [
        f"training done: {resumed}{len(rows)} steps in {duration(last['time'] - launched_at)} from launch",
        f"step {int(first['step'])} logged at {duration(first['time'] - launched_at)}",
    ]
    step_seconds = [row["time/step_s"] for row in rows if "time/step_s" in row]
    if step_seconds:
        parts.append(f"median step {statistics.median(step_seconds):.2f} s{phase_shares(rows)}")
    rewards = [row["reward/mean"] for row in rows[-END_REWARD_STEPS:] if "reward/mean" in row]
    if rewards:
        parts.append(f"reward {statistics.fmean(rewards):.3f} (mean of the last {len(rewards)} steps)")
    validated = [row for row in rows if "val/accuracy" in row]
    if validated:
        parts.append(f"val_acc {validated[-1]['val/accuracy']:.3f} (step {int(validated[-1]['step'])})")
    if picture is not None:
        parts.append(f"curves: {picture}")
    return " | ".join(parts)


def phase_shares(rows: list[dict[str, float]]) -> str:
    """`` (rollout 52%, forward 16%, update 38%, sync 2%)``: each phase's share of the summed step
    times, ``other`` for the rest when it shows; empty when the rows have no phases."""
    total = sum(row.get("time/step_s", 0.0) for row in rows)
    shares = {label: sum(row.get(name, 0.0) for row in rows) for name, label in STEP_PHASES if any(name in row for row in rows)}
    if not shares or total <= 0:
        return ""
    shares = {label: seconds / total for label, seconds in shares.items()}
    other = 1 - sum(shares.values())
    if round(other * 100) >= 1:
        shares["other"] = other
    return " (" + ", ".join(f"{label} {share:.0%}" for label, share in shares.items()) + ")"


def duration(seconds: float) -> str:
    """``16.0 s``, ``2 min 33 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def load_run(path: Path) -> tuple[str, list[dict[str, float]]]:
    """A run directory or a metrics file -> (the run's name, its rows). The name is the run
    directory's: the folder given, or the one holding a ``metrics.jsonl`` (another file: its
    stem).

    Raises:
        MetricsFileError: see :func:`~megarl.metrics.read_rows`.
    """
    if path.is_dir():
        return path.resolve().name, read_rows(path / "metrics.jsonl")
    name = path.resolve().parent.name if path.name == "metrics.jsonl" else path.stem
    return name, read_rows(path)


def plot_runs(runs: dict[str, list[dict[str, float]]], out: Path) -> Path:
    """Draw the curves of ``runs`` (name -> ``metrics.jsonl`` rows) into the PNG ``out`` and
    return it. Two panels a row: reward and validation accuracy, response length, entropy, KL and
    mismatch (the runs overlaid, a colour each), then step time by phase, one panel per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colours = {name: f"C{index % 10}" for index, name in enumerate(runs)}
    phase_rows = -(-len(runs) // 2)
    figure = Figure(figsize=(13, 3.8 * (2 + phase_rows)), layout="constrained")
    grid = figure.add_gridspec(2 + phase_rows, 2)
    _reward_panel(figure.add_subplot(grid[0, 0]), runs, colours)
    _metric_panel(figure.add_subplot(grid[0, 1]), runs, colours, "response/length_mean", "Response length (tokens)")
    _metric_panel(figure.add_subplot(grid[1, 0]), runs, colours, "policy/entropy", "Entropy (nats per token)")
    _kl_panel(figure.add_subplot(grid[1, 1]), runs, colours)
    shared = None
    for index, (name, rows) in enumerate(runs.items()):
        row, column = divmod(index, 2)
        alone = index == len(runs) - 1 and column == 0
        axes = figure.add_subplot(grid[2 + row, :] if alone else grid[2 + row, column], sharex=shared, sharey=shared)
        shared = shared or axes
        _phase_panel(axes, rows, f"Step time by phase: {name}" if len(runs) > 1 else "Step time by phase")
    if len(runs) > 1:
        handles = [Line2D([], [], color=colours[name], linewidth=2, label=name) for name in runs]
        figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4))
    else:
        (name,) = runs
        figure.suptitle(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out))
    return out


def _series(rows: list[dict[str, float]], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have ``name``; a value that is not finite becomes NaN (a
    gap in the line)."""
    present = [row for row in rows if name in row]
    return [row["step"] for row in present], [row[name] if math.isfinite(row[name]) else math.nan for row in present]


def _trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start), NaN left out."""
    means = []
    for index in range(len(values)):
        finite = [value for value in values[max(0, index - window + 1) : index + 1] if not math.isnan(value)]
        means.append(statistics.fmean(finite) if finite else math.nan)
    return means


def _note(axes, text: str) -> None:
    """Say in the middle of an empty panel why it is empty."""
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="0.4", wrap=True).set_in_layout(False)
    axes.set_xticks([])
    axes.set_yticks([])


def _style_legend(axes, styles: dict[str, dict], title: str | None = None) -> None:
    """A legend of line styles (label -> ``plot`` keywords) in grey, the colours being the runs'."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", label=label, **style) for label, style in styles.items()]
    axes.legend(handles=handles, fontsize="small", title=title, title_fontsize="x-small")


RAW_STYLE = {"linewidth": 0.8, "alpha": 0.35}
SMOOTHED_STYLE = {"linewidth": 2}
"""A noisy metric's two lines: each step's value, faint, and its trailing mean over
:data:`SMOOTHING_STEPS` steps, bold."""


def _plot_smoothed(axes, rows, name: str, colour: str, styles: dict[str, dict]) -> None:
    """Draw ``name``'s values and their trailing mean (nothing when the rows lack it), adding the
    two styles to ``styles`` for the legend."""
    steps, values = _series(rows, name)
    if not steps:
        return
    axes.plot(steps, values, color=colour, **RAW_STYLE)
    axes.plot(steps, _trailing_mean(values, SMOOTHING_STEPS), color=colour, **SMOOTHED_STYLE)
    styles[name] = RAW_STYLE
    styles[f"{name}, {SMOOTHING_STEPS}-step mean"] = SMOOTHED_STYLE


def _reward_panel(axes, runs, colours) -> None:
    axes.set_title("Reward and validation accuracy")
    styles = {}
    for name, rows in runs.items():
        _plot_smoothed(axes, rows, "reward/mean", colours[name], styles)
        steps, accuracy = _series(rows, "val/accuracy")
        if steps:
            axes.plot(steps, accuracy, color=colours[name], linestyle="--", marker="o", markersize=4)
            styles["val/accuracy"] = {"linestyle": "--", "marker": "o", "markersize": 4}
    if not styles:
        _note(axes, "no reward/mean or val/accuracy in the metrics")
        return
    axes.set_xlabel("step")
    _style_legend(axes, styles)


def _metric_panel(axes, runs, colours, name: str, title: str) -> None:
    axes.set_title(title)
    styles = {}
    for run, rows in runs.items():
        _plot_smoothed(axes, rows, name, colours[run], styles)
    if not styles:
        _note(axes, f"no {name} in the metrics")
        return
    axes.set_xlabel("step")
    _style_legend(axes, styles)


def _kl_panel(axes, runs, colours) -> None:
    """Log scale: the KL terms and the mismatch are orders of magnitude apart. A metric with no
    positive value in any run (absent, or 0 when its term is off) is named in the legend."""
    axes.set_title("KL and train/rollout mismatch")
    styles, left_out = {}, []
    for name, line_style in zip(KL_METRICS, KL_LINE_STYLES):
        series = {run: _series(rows, name) for run, rows in runs.items()}
        if not any(value > 0 for _, values in series.values() for value in values):
            left_out.append(name)
            continue
        for run, (steps, values) in series.items():
            axes.plot(steps, [value if value > 0 else math.nan for value in values], color=colours[run], linestyle=line_style, linewidth=1.2)
        styles[name] = {"linestyle": line_style}
    if not styles:
        _note(axes, "no KL or mismatch metric above 0 in the metrics\n(" + ", ".join(KL_METRICS) + ")")
        return
    axes.set_yscale("log")
    axes.set_xlabel("step")
    _style_legend(axes, styles, title=f"zero or absent: {', '.join(left_out)}" if left_out else None)


def _phase_panel(axes, rows, title: str) -> None:
    """The step's phases stacked (:data:`~megarl.metrics.STEP_PHASES`; ``other`` is what the step
    took besides them), so the top edge is ``time/step_s``."""
    from matplotlib import colormaps

    axes.set_title(title)
    timed = [row for row in rows if "time/step_s" in row]
    if not timed:
        _note(axes, "no time/step_s in the metrics")
        return
    phases = [(name, label) for name, label in STEP_PHASES if any(name in row for row in timed)]
    layers = {label: [row.get(name, 0.0) for row in timed] for name, label in phases}
    layers["other"] = [max(row["time/step_s"] - sum(row.get(name, 0.0) for name, _ in phases), 0.0) for row in timed]
    palette = colormaps["Set2"]
    axes.stackplot(
        [row["step"] for row in timed], list(layers.values()), labels=list(layers), colors=[palette(index) for index in range(len(layers))]
    )
    axes.margins(y=0.25)  # room for the legend above the highest step
    axes.set_xlabel("step")
    axes.set_ylabel("seconds")
    axes.legend(loc="upper right", fontsize="small", ncols=len(layers))
