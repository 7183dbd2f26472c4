"""How long bad input takes to be refused: from launch to exit, median of several runs.

Each case is the README's training command with one mistake a user makes (a config typo, a data
file or reward file that does not exist, a misspelt reward function, a reward file with a syntax
error), launched as ``python -m megarl.train`` (one process, ``WORLD_SIZE=2`` as under torchrun),
as ``torchrun --nproc_per_node 2 -m megarl.train``, and checked with ``python -m megarl.config``.
Every run must end with megarl's line for that mistake (exit 2; torchrun's 1); the table shows
the median wall time and the spread.

    python tools/bench_fail_fast.py [--runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cases(directory: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (overrides on configs/moe_grpo.yaml, a part of the line megarl must print)."""
    good = directory / "rewards.py"
    good.write_text("def reward(prompt, response, answer, **row):\n    return 1.0\n")
    broken = directory / "broken.py"
    broken.write_text("def reward(prompt, response, answer, **row):\n    return (1.0\n")
    return {
        "config typo": (["train.mini_batch_sise=8"], "unknown key `train.mini_batch_sise`"),
        "missing data file": ([f"data.train_files=[{directory}/missing.jsonl]"], "missing.jsonl does not exist"),
        "missing reward file": (["reward.type=function", f"reward.function={directory}/missing.py:reward"], "missing.py does not exist"),
        "misspelt reward function": (["reward.type=function", f"reward.function={good}:rewrad"], "has no function named 'rewrad'"),
        "reward syntax error": (["reward.type=function", f"reward.function={broken}:reward"], "syntax error"),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launchers() -> dict[str, tuple[list[str], dict[str, str], int]]:
    """Launcher name -> (command before the arguments, environment, expected exit code)."""
    return {
        "python -m megarl.train": ([sys.executable, "-m", "megarl.train"], {"WORLD_SIZE": "2"}, 2),
        "torchrun (2 processes)": ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "{port}", "-m", "megarl.train"], {}, 1),
        "python -m megarl.config": ([sys.executable, "-m", "megarl.config"], {"WORLD_SIZE": "2"}, 2),
    }


def time_once(command: list[str], environment: dict[str, str], expected_code: int, expected_text: str) -> float:
    command = [part.replace("{port}", str(free_port())) for part in command]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **environment}, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if result.returncode != expected_code or expected_text not in result.stderr:
        raise SystemExit(f"{' '.join(command)}: exit {result.returncode}, expected {expected_code} and {expected_text!r}:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case and launcher (after one untimed)")
    parser.add_argument("--json", help="also write the times to this file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        for case, (overrides, expected_text) in cases(directory).items():
            arguments = ["--config", "configs/moe_grpo.yaml", *overrides, f"logging.run_dir={directory / 'run'}"]
            for launcher, (command, environment, code) in launchers().items():
                time_once([*command, *arguments], environment, code, expected_text)
                times = [time_once([*command, *arguments], environment, code, expected_text) for _ in range(args.runs)]
                results.append({"case": case, "launcher": launcher, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
    print(f"{args.runs} runs each, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| mistake | launcher | median (s) | min - max (s) |")
    print("| --- | --- | ---: | ---: |")
    for row in results:
        print(f"| {row['case']} | {row['launcher']} | {row['median_s']:.2f} | {row['min_s']:.2f} - {row['max_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
