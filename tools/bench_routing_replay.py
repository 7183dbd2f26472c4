"""What routing replay does to the train/rollout mismatch of an MoE policy, at step 0.

Each run is the README's main job (``configs/moe_grpo.yaml``, 2 processes, EP 2) for one step,
with the engine's numerics equal to the trainer's (fp32) or deliberately different (the ``hf``
engine in bf16: ``rollout.dtype=bf16``), and ``algorithm.routing_replay`` ``none`` or ``r3``.
Step 0 trains the weights the engine generated with, so the mismatch is the engine's numerics
alone. The table gives, per case, the median over ``--seeds`` sampling seeds of:

- ``mismatch/logprob_diff_abs_mean``, ``_max`` and ``mismatch/rollout_kl``: the trainer's old
  log-probs against the engine's (``docs/rl_step.md``, 4d);
- ``moe/routing_diff``: the share of (token, MoE layer) pairs the trainer's pass routed unlike the
  engine (0 under replay);
- ``moe/routing_diff_recomputed``: the same for the trainer's own routing, measured in the pass
  (with ``r3`` only: it needs the engine's routing).

    python tools/bench_routing_replay.py [--seeds 3] [--override KEY=VALUE] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CASES = [("fp32", "none"), ("fp32", "r3"), ("bf16", "none"), ("bf16", "r3")]
"""(engine dtype, routing replay) of each row."""
METRICS = ["mismatch/logprob_diff_abs_mean", "mismatch/logprob_diff_abs_max", "mismatch/rollout_kl", "moe/routing_diff", "moe/routing_diff_recomputed"]


def step_zero(directory: Path, dtype: str, replay: str, seed: int, extra: list[str]) -> dict[str, float]:
    """The step-0 metrics of one run (``extra``: more overrides)."""
    overrides = [
        *extra, "train.steps=1", "train.eval_every=0", "checkpoint.resume=never", f"logging.run_dir={directory}",
        f"rollout.dtype={dtype}", f"algorithm.routing_replay={replay}", f"rollout.seed={seed}",
    ]
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "megarl.train", "--config", "configs/moe_grpo.yaml", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    row = json.loads((directory / "metrics.jsonl").read_text().splitlines()[0])
    return {name: row[name] for name in METRICS if name in row}


def machine() -> str:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per case (the table shows medians)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable), e.g. model.path=bundled:tiny-deepseek-v3")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_routing_replay_") as root:
        for dtype, replay in CASES:
            runs = [step_zero(Path(root) / f"{dtype}-{replay}-{seed}", dtype, replay, seed, args.override) for seed in range(1, args.seeds + 1)]
            medians = {name: statistics.median(run[name] for run in runs) for name in METRICS if all(name in run for run in runs)}
            rows.append({"engine_dtype": dtype, "routing_replay": replay, **medians, "runs": runs})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(
        f"{datetime.date.today().isoformat()}, commit {commit}, {machine()}; load average (1 min) {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; trainer fp32, medians of {args.seeds} seeds{'; ' + ' '.join(args.override) if args.override else ''}\n"
    )
    print("| engine | routing replay | log-prob diff, mean abs | max abs | rollout KL | routing diff (as trained) | routing diff (trainer's own) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cells = [f"{row[name]:.3g}" if name in row else "-" for name in METRICS]
        print(f"| {row['engine_dtype']} | {row['routing_replay']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
