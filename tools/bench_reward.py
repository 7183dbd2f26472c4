"""What scoring a step's samples costs with each ``reward.isolation``: the worker pool against the
in-process scorer.

Scores a batch of the main job's size (16 prompts x 8 samples = 128) of the bundled toy task, each
response a digit and the end-of-turn token as the tiny model writes it, with the scorer
``build_scorer`` gives for ``reward.isolation`` ``process`` (``reward.num_workers`` 2, the default)
and ``none``; reports the median and the spread of ``--calls`` calls of ``score()`` after a warm-up
call (which, for the pool, waits for its workers to start and import).

    python tools/bench_reward.py [--samples 128] [--calls 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from megarl.config import load_config
from megarl.rewards.scorer import build_scorer

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "megarl" / "assets" / "data" / "toy" / "train.jsonl"


def toy_samples(count: int) -> list[dict]:
    """``count`` reward-function arguments from the toy prompts: a random digit as the response,
    right about a tenth of the time."""
    rows = [json.loads(line) for line in TOY_TRAIN.read_text().splitlines()]
    pick = random.Random(0)
    return [
        {**row, "response": f" {pick.randrange(10)}<|im_end|>"}
        for row in (rows[index % len(rows)] for index in range(count))
    ]


def time_scorer(isolation: str, samples: list[dict], calls: int) -> dict[str, float]:
    """Milliseconds per ``score(samples)`` call: median, min and max over ``calls`` after a warm-up."""
    config = load_config(None, [f"reward.isolation={isolation}"]).reward
    with build_scorer(config) as scorer:
        scorer.score(samples)
        durations = []
        for _ in range(calls):
            start = time.perf_counter()
            scorer.score(samples)
            durations.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(durations), "min_ms": min(durations), "max_ms": max(durations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="samples per score() call (the main job's batch: 128)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per scorer, after one warm-up call")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    samples = toy_samples(args.samples)
    results = {isolation: time_scorer(isolation, samples, args.calls) for isolation in ("process", "none")}
    print(f"score() of {args.samples} toy samples, median of {args.calls} calls (min - max), ms")
    for isolation, result in results.items():
        print(f"  reward.isolation={isolation:8s} {result['median_ms']:8.3f}  ({result['min_ms']:.3f} - {result['max_ms']:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "calls": args.calls, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
