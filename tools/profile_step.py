"""Where the main job's time goes: start-up, the phases of a step, and the time to a reward of 0.8.

Runs the README's main command, ``torchrun --nproc_per_node 2 -m megarl.train --config
configs/moe_grpo.yaml``, ``--runs`` times, each from a fresh run directory
(``checkpoint.resume=never``), timed from the launch, and reads each run's ``metrics.jsonl``:

- **first step**: seconds from the launch to the end of step 0 (its row's ``time``), which
  includes step 0 itself and any validation pass logged with it (``train.val_before_train``, or
  ``train.eval_every: 1``); **start-up**: the same minus step 0's ``time/step_s`` and those
  passes' ``time/validation_s`` and ``time/validation_before_train_s`` (what comes before the
  first rollout: processes, imports, models, engines, reward workers).
- **step** and its **phases**, medians over the steps: ``time/rollout_s`` (split into
  ``time/generate_s`` and ``time/reward_s``; the rest of it is packing and broadcasting),
  ``time/forward_s`` (old and reference log-probs), ``time/update_s``, ``weights/sync_s``, and
  ``rollout/rounds`` and ``rollout/prompts`` (the generation calls of a step and their prompts:
  dynamic sampling over-samples, and may need a second call).
- **to 0.8**: seconds from the launch to the end of the first step at which the mean
  ``reward/mean`` of the last 10 steps reaches 0.8; **end**: the mean reward of the last 20 steps
  and the last validation accuracy; **wall**: launch to exit.

Every value is the median over the runs (min - max beside it). The table is printed, and with
``--json`` written to a file; ``docs/benchmarks.md`` ("Main job: start-up and the phases of a
step") quotes it with the machine, the date and the load.

    python tools/profile_step.py [--runs 3] [--steps 200] [--override KEY=VALUE] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# The sibling benchmark's launch helpers and its rule for the time to 0.8, shared rather than restated.
from bench_rollout import BIN, REPO, free_port, time_to_reward

from megarl.metrics import read_rows

PHASES = [
    ("step", "time/step_s"),
    ("rollout", "time/rollout_s"),
    ("rollout: generation", "time/generate_s"),
    ("rollout: reward", "time/reward_s"),
    ("forward (old and reference log-probs)", "time/forward_s"),
    ("update", "time/update_s"),
    ("weight sync", "weights/sync_s"),
]
"""(table row, the metric whose median over the steps after the first it shows, in seconds)."""


def run_once(run_dir: Path, steps: int, overrides: list[str]) -> dict:
    """One launch of the main command; its timings (see the module docstring)."""
    command = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megarl.train",
        "--config", "configs/moe_grpo.yaml", f"train.steps={steps}", f"logging.run_dir={run_dir}", "checkpoint.resume=never", *overrides,
    ]
    load = os.getloadavg()[0]
    launched = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    wall = time.time() - launched
    if result.returncode:
        raise SystemExit(f"{' '.join(command)}: exit {result.returncode}; see {run_dir.parent / f'{run_dir.name}.log'}")
    rows = read_rows(run_dir / "metrics.jsonl")
    first = rows[0]
    first_step_s = first["time"] - launched
    reached = time_to_reward(rows)
    validations = [row["val/accuracy"] for row in rows if "val/accuracy" in row]
    return {
        "first_step_s": first_step_s,
        "startup_s": first_step_s - first["time/step_s"] - first.get("time/validation_s", 0.0) - first.get("time/validation_before_train_s", 0.0),
        **{key: statistics.median(row[key] for row in rows[1:] or rows) for _, key in PHASES},
        "rounds": statistics.fmean(row.get("rollout/rounds", 1) for row in rows),
        "prompts": statistics.fmean(row.get("rollout/prompts", 0) for row in rows),
        "to_0.8_s": rows[reached[0]]["time"] - launched if reached else None,
        "to_0.8_step": reached[0] if reached else None,
        "end_reward": statistics.fmean(row["reward/mean"] for row in rows[-20:]),
        "end_validation": validations[-1] if validations else None,
        "wall_s": wall,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def spread(values: list[float | None], digits: int = 2) -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.median(present):.{digits}f} ({min(present):.{digits}f} - {max(present):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="RL steps of each run (the config's 200 by default)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable)")
    parser.add_argument("--keep", help="put the run directories here and keep them (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megarl-profile-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        runs = []
        for index in range(args.runs):
            runs.append(run_once(root / f"run-{index}", args.steps, args.override))
            print(f"run {index}: first step {runs[-1]['first_step_s']:.1f} s, median step {runs[-1]['time/step_s']:.3f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average (1 min) {min(run['load_before'] for run in runs):.1f} - {max(run['load_after'] for run in runs):.1f} around the runs; "
          f"{args.runs} runs of {args.steps} steps{', ' + ' '.join(args.override) if args.override else ''}\n")
    print("| | seconds (median, min - max) |\n| --- | ---: |")
    rows = [("launch to the end of step 0 (a validation logged with it included)", "first_step_s", 1), ("start-up before the first rollout", "startup_s", 1)]
    rows += [(f"median {label}", key, 3) for label, key in PHASES]
    for label, key, digits in rows:
        print(f"| {label} | {spread([run[key] for run in runs], digits)} |")
    print(f"| rounds per step (mean) | {spread([run['rounds'] for run in runs])} |")
    print(f"| prompts generated per step (mean) | {spread([run['prompts'] for run in runs], 1)} |")
    print(f"| launch to a 10-step mean reward of 0.8 | {spread([run['to_0.8_s'] for run in runs], 1)} (step {spread([run['to_0.8_step'] for run in runs], 0)}) |")
    print(f"| mean reward, last 20 steps | {spread([run['end_reward'] for run in runs], 3)} |")
    print(f"| last validation accuracy | {spread([run['end_validation'] for run in runs], 3)} |")
    print(f"| launch to exit | {spread([run['wall_s'] for run in runs], 1)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "steps": args.steps, "overrides": args.override, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
