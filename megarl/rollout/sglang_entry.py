"""``python -m sglang.launch_server`` that dies with the process that launched it.

::

    python -m megarl.rollout.sglang_entry --parent-pid PID [sglang.launch_server arguments ...]

Starts :func:`megarl.rollout.watchdog.start_parent_watchdog`, then runs SGLang's launcher in this
process, exactly as ``python -m sglang.launch_server`` would.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from megarl.rollout.watchdog import start_parent_watchdog


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m megarl.rollout.sglang_entry", add_help=False)
    parser.add_argument("--parent-pid", type=int, required=True)
    args, sglang_args = parser.parse_known_args(argv)
    start_parent_watchdog(args.parent_pid)
    sys.argv = ["sglang.launch_server", *sglang_args]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
