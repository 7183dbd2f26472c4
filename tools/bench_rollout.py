"""Synchronous against asynchronous rollout: samples/s, overlap and time to a reward of 0.8.

Each run is the real training command, ``torchrun --nproc_per_node 2 -m megarl.train``, on
``configs/moe_grpo.yaml`` (``rollout.mode: sync``) or ``configs/moe_grpo_async.yaml`` (the same
task and model, ``rollout.mode: async``, ``max_staleness`` 1, partial rollout), in a fresh run
directory (``checkpoint.resume=never``; a checkpoint only after the last step, no HF export), and
is read back from its ``metrics.jsonl``:

- **samples/s**: ``train.global_batch_size`` x the steps after the first / the seconds from the
  end of the first step to the end of the last (the rows' ``time``), so that start-up (processes,
  model, engine, the first batch) is left out. Short runs (``--steps``, validation off), median
  over ``--runs``; the runs are interleaved (repeat by repeat, every configuration once) so that
  the load of other processes drifts over all of them alike.
- **overlap** (async): the sum of ``time/overlap_s`` (the rollout working while the trainer did
  not wait for it) / the sum of ``time/step_s``; **waited**: the sum of the seconds the trainer
  spent getting its samples (``time/rollout_s``: generating them in sync, waiting for them in
  async) / the sum of ``time/step_s``. Also the largest ``rollout/staleness_max`` and the
  ``rollout/dropped_stale`` samples.
- **time to 0.8** (``--learning``): one full-length run per mode (the configs as they are: 200
  steps, validation every 25) at no added latency; the first step at which the mean of
  ``reward/mean`` over the last 10 steps reaches 0.8, and the seconds from the start of step 0
  to the end of that step. ``--learning-runs SYNC_DIR ASYNC_DIR`` reports finished runs instead.

**Modelled engine latency.** On a 2-core CPU the engine and the two trainer processes share the
cores, so generating while training only moves work from one core to the other: overlap gains
nothing there. ``--latency`` (``rollout.hf_step_delay_s``, default 0.04 s) makes the embedded ``hf`` engine
wait that long after every decoding step while holding its model, as a GPU engine is busy for a
decode step without using the host's cores. 0.04 s is a model, not a measurement: the order of
one decode step of a 30B-parameter MoE (3B active) on one H100 at a small batch, 20-40 ms. With
responses of at most 4 tokens it adds about 0.16 s to each round of 128 samples, and a step
generates 2-4 rounds (dynamic sampling), so generation becomes as long as the training part of a
step here (0.6-0.8 s), as in GPU RL runs where generation takes half of a step or more.

    python tools/bench_rollout.py [--steps 20] [--runs 3] [--latency 0.04] [--json FILE]   # ~9 min
    python tools/bench_rollout.py --learning            # also the two 200-step runs (~5 min each)
    python tools/bench_rollout.py --learning-runs runs/sync runs/async --runs 0   # report only
    python tools/bench_rollout.py --override algorithm.dynamic_sampling=false      # any config change
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from megarl.metrics import read_rows

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = {"sync": "configs/moe_grpo.yaml", "async": "configs/moe_grpo_async.yaml"}
REWARD_TARGET = 0.8
REWARD_WINDOW = 10
"""Time to 0.8: the first step at which the mean ``reward/mean`` of the last 10 steps reaches 0.8."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(mode: str, run_dir: Path, overrides: list[str], timeout_s: float) -> dict:
    """One training run of ``mode``'s config in ``run_dir`` (its console output in ``train.log``
    there); returns the wall time and the load average around it."""
    run_dir.mkdir(parents=True)
    command = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megarl.train",
        "--config", CONFIGS[mode], f"logging.run_dir={run_dir}", "checkpoint.resume=never", "checkpoint.save_every=0",
        "checkpoint.save_hf=false", *overrides,
    ]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if result.returncode:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise SystemExit(f"{' '.join(command)}: exit {result.returncode}:\n{tail}")
    return {"wall_s": seconds, "load_before": load_before, "load_after": os.getloadavg()[0]}


def resolved_config(run_dir: Path) -> dict:
    """The resolved config the run wrote when training started."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def throughput(rows: list[dict], batch_size: int) -> dict:
    """Samples/s, overlap and staleness of one run, start-up (the first step) left out."""
    measured = rows[1:]
    if not measured:
        raise SystemExit("a throughput run needs at least 2 steps")
    step_s = sum(row["time/step_s"] for row in measured)
    return {
        "steps": len(rows),
        "samples_per_s": batch_size * len(measured) / (rows[-1]["time"] - rows[0]["time"]),
        "median_step_s": statistics.median(row["time/step_s"] for row in measured),
        "overlap_ratio": sum(row.get("time/overlap_s", 0.0) for row in measured) / step_s,
        "waited_ratio": sum(row["time/rollout_s"] for row in measured) / step_s,
        "staleness_max": max(row.get("rollout/staleness_max", 0.0) for row in rows),
        "dropped_stale": sum(row.get("rollout/dropped_stale", 0.0) for row in rows),
    }


def time_to_reward(rows: list[dict], target: float = REWARD_TARGET, window: int = REWARD_WINDOW) -> tuple[int, float] | None:
    """``(step, seconds)``: the first step whose mean ``reward/mean`` over the last ``window``
    steps (itself included) is at least ``target``, and the seconds from the start of the first
    row's step to the end of that step; None if the run never gets there."""
    started = rows[0]["time"] - rows[0]["time/step_s"]
    rewards = [row["reward/mean"] for row in rows]
    for end in range(window, len(rows) + 1):
        if statistics.fmean(rewards[end - window : end]) >= target:
            return int(rows[end - 1]["step"]), rows[end - 1]["time"] - started
    return None


def learning(mode: str, run_dir: Path) -> dict:
    """Time to 0.8 of a finished run, its samples/s over the whole run (validation included) and
    its last validation accuracy."""
    config = resolved_config(run_dir)
    if config["rollout"]["mode"] != mode:
        raise SystemExit(f"{run_dir}/config.yaml: rollout.mode is {config['rollout']['mode']}, expected {mode}")
    rows = read_rows(run_dir / "metrics.jsonl")
    reached = time_to_reward(rows)
    started = rows[0]["time"] - rows[0]["time/step_s"]
    validations = [row["val/accuracy"] for row in rows if "val/accuracy" in row]
    return {
        "mode": mode,
        "run_dir": str(run_dir),
        "steps": len(rows),
        "step_to_target": reached[0] if reached else None,
        "seconds_to_target": reached[1] if reached else None,
        "samples_per_s": config["train"]["global_batch_size"] * len(rows) / (rows[-1]["time"] - started),
        "final_val_accuracy": validations[-1] if validations else None,
    }


def summarise(runs: list[dict], latencies: list[float]) -> list[dict]:
    """Per latency and mode: medians over the runs, the largest staleness, all dropped samples."""
    table = []
    for latency in latencies:
        sync_median = None
        for mode in CONFIGS:
            chosen = [run for run in runs if run["latency_s"] == latency and run["mode"] == mode]
            rates = [run["samples_per_s"] for run in chosen]
            row = {
                "latency_s": latency,
                "mode": mode,
                "runs": len(chosen),
                "samples_per_s": statistics.median(rates),
                "samples_per_s_min": min(rates),
                "samples_per_s_max": max(rates),
                "median_step_s": statistics.median(run["median_step_s"] for run in chosen),
                "overlap_ratio": statistics.median(run["overlap_ratio"] for run in chosen),
                "waited_ratio": statistics.median(run["waited_ratio"] for run in chosen),
                "staleness_max": max(run["staleness_max"] for run in chosen),
                "dropped_stale": sum(run["dropped_stale"] for run in chosen),
            }
            sync_median = row["samples_per_s"] if mode == "sync" else sync_median
            row["vs_sync"] = row["samples_per_s"] / sync_median
            table.append(row)
    return table


def machine() -> dict:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}


def print_report(report: dict) -> None:
    print(
        f"{report['date']}, commit {report['commit']}, {report['machine']['cpu']}, {report['machine']['cores']} cores; load average (1 min) "
        f"{report['load_before']:.1f} at the start, {report['load_after']:.1f} at the end"
    )
    if report["runs"]:
        loads = [load for run in report["runs"] for load in (run["load_before"], run["load_after"])]
        overrides = " ".join(report["settings"]["overrides"])
        print(
            f"{report['settings']['steps']} steps per run, {report['settings']['runs']} runs per row (median; min - max); "
            f"load average around the runs {min(loads):.1f} - {max(loads):.1f}"
            f"{'; every run with ' + overrides if overrides else ''}\n"
        )
        print("| engine latency | mode | samples/s | vs sync | s/step | overlap / step | waited / step | staleness max | dropped |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in report["throughput"]:
            overlap = f"{row['overlap_ratio']:.0%}" if row["mode"] == "async" else "-"
            print(
                f"| {row['latency_s'] * 1e3:g} ms/token | {row['mode']} | {row['samples_per_s']:.1f} "
                f"({row['samples_per_s_min']:.1f} - {row['samples_per_s_max']:.1f}) | {row['vs_sync']:.2f}x | "
                f"{row['median_step_s']:.2f} | {overlap} | {row['waited_ratio']:.0%} | {row['staleness_max']:.0f} | {row['dropped_stale']:.0f} |"
            )
    if report["learning"]:
        print(
            f"\n| mode | steps | step at which the {REWARD_WINDOW}-step mean reward reaches {REWARD_TARGET} | seconds to it | "
            "samples/s (whole run) | last validation | load average before - after |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for row in report["learning"]:
            reached = row["step_to_target"] is not None
            step = f"{row['step_to_target']}" if reached else "not reached"
            seconds = f"{row['seconds_to_target']:.0f}" if reached else "-"
            validation = "-" if row["final_val_accuracy"] is None else f"{row['final_val_accuracy']:.3f}"
            load = f"{row['load_before']:.1f} - {row['load_after']:.1f}" if "load_before" in row else "not recorded"
            print(f"| {row['mode']} | {row['steps']} | {step} | {seconds} | {row['samples_per_s']:.1f} | {validation} | {load} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="RL steps of each throughput run (the first is start-up, left out)")
    parser.add_argument("--runs", type=int, default=3, help="throughput runs per mode and latency (0: none)")
    parser.add_argument("--latency", type=float, default=0.04, help="modelled engine latency, seconds per decoding step (every configuration also runs without)")
    learning_source = parser.add_mutually_exclusive_group()
    learning_source.add_argument("--learning", action="store_true", help="also one full-length run per mode for the time to 0.8")
    learning_source.add_argument("--learning-runs", nargs=2, metavar=("SYNC_DIR", "ASYNC_DIR"), help="finished run directories to report the time to 0.8 of")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable), e.g. algorithm.dynamic_sampling=false")
    parser.add_argument("--keep", help="put the run directories here and keep them (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    root = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    latencies = [0.0, args.latency]
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "machine": machine(),
        "settings": {"steps": args.steps, "runs": args.runs, "latencies_s": latencies, "configs": CONFIGS, "overrides": args.override},
        "load_before": os.getloadavg()[0],
        "runs": [],
        "throughput": [],
        "learning": [],
    }
    try:
        for repeat in range(args.runs):
            for latency in latencies:
                for mode in CONFIGS:
                    run_dir = root / f"{mode}-{latency:g}s-{repeat}"
                    overrides = [f"train.steps={args.steps}", "train.eval_every=0", f"rollout.hf_step_delay_s={latency}", *args.override]
                    timing = train(mode, run_dir, overrides, timeout_s=600 + 30 * args.steps)
                    measured = throughput(read_rows(run_dir / "metrics.jsonl"), resolved_config(run_dir)["train"]["global_batch_size"])
                    report["runs"].append({"mode": mode, "latency_s": latency, "repeat": repeat, **timing, **measured})
                    print(f"{mode}, {latency:g} s/token, run {repeat}: {measured['samples_per_s']:.1f} samples/s", file=sys.stderr)
        if args.runs:
            report["throughput"] = summarise(report["runs"], latencies)
        if args.learning:
            for mode in CONFIGS:
                run_dir = root / f"{mode}-learning"
                timing = train(mode, run_dir, args.override, timeout_s=3600)
                report["learning"].append({**learning(mode, run_dir), **timing})
        elif args.learning_runs:
            report["learning"] = [learning(mode, Path(directory)) for mode, directory in zip(CONFIGS, args.learning_runs)]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["load_after"] = os.getloadavg()[0]
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
