"""Draw a run's curves, or compare runs: the picture a run leaves as ``<run dir>/curves.png``.

    python tools/plot_run.py runs/moe_grpo                       # -> runs/moe_grpo/curves.png
    python tools/plot_run.py runs/a/metrics.jsonl -o a.png
    python tools/plot_run.py runs/sync runs/async -o compare.png  # overlaid, a colour per run

Each argument is a run directory or a ``metrics.jsonl``; the legend names each run by its
directory. Panels (``megarl.report.plot_runs``): reward (``reward/mean`` and its 10-step mean) with
validation accuracy (``val/accuracy``), response length (``response/length_mean``), entropy
(``policy/entropy``), KL and train/rollout mismatch (``policy/approx_kl``, ``policy/kl_loss``,
``kl/reward_kl``, ``mismatch/rollout_kl``, ``mismatch/logprob_diff_abs_mean``, log scale), and each
run's step time stacked by phase (rollout, forward, update, sync). A metric a run does not have
leaves its curve out, or its panel empty with a note. The file may be read while the run writes it.

Output: ``-o``; by default ``curves.png`` in the run directory for one run, ``compare.png`` in the
current directory for several. It prints ``wrote PATH``. A path that is not a readable
``metrics.jsonl`` (or a directory holding one) is refused with one line naming the file and exit
code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROGRAM = "plot_run"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR_or_metrics.jsonl", help="a run directory or its metrics.jsonl; several to compare")
    parser.add_argument("-o", "--out", type=Path, help="the PNG to write (default: see above)")
    args = parser.parse_args(argv)
    from megarl.cli import refuse
    from megarl.metrics import MetricsFileError
    from megarl.report import PICTURE_NAME, load_run, plot_runs

    try:
        loaded = [load_run(path) for path in args.runs]
    except MetricsFileError as error:
        return refuse(PROGRAM, error)
    names = [name for name, _ in loaded]
    if len(set(names)) < len(names):
        # Two run directories of the same name (runs/a/x, runs/b/x): the paths as given tell them apart.
        names = [str(path) for path in args.runs]
    out = args.out
    if out is None and len(args.runs) > 1:
        out = Path("compare.png")
    elif out is None:
        out = (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / PICTURE_NAME
    try:
        plot_runs(dict(zip(names, (rows for _, rows in loaded))), out)
    except OSError as error:
        return refuse(PROGRAM, f"{out}: cannot be written ({error.strerror or error})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
