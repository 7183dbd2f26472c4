"""``python -m sglang_router.launch_router`` that dies with the process that launched it.

::

    python -m megarl.rollout.router_entry --parent-pid PID [sglang_router.launch_router arguments ...]

Starts :func:`megarl.rollout.watchdog.start_parent_watchdog`, then runs sglang-router's launcher as
a child process in this process's group and exits with its exit code.
:class:`megarl.rollout.router.Router` launches it as a process-group leader, so the watchdog's
``killpg`` takes the router down with it.

Unlike :mod:`megarl.rollout.sglang_entry`, the launcher cannot run in this process: sglang-router's
Rust server holds the GIL for as long as it serves (measured with 0.3.2: a watchdog thread beside
it never ran, and the router outlived its killed launcher), so the watchdog needs a process of its
own. A SIGTERM sent to this process alone is passed on to the router; one sent to the group (what
``Router.stop`` does) reaches the router directly, and this process waits for it to exit.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from megarl.rollout.watchdog import start_parent_watchdog


def main(argv: list[str]) -> int:
    """Run the router until it exits; its exit code."""
    parser = argparse.ArgumentParser(prog="python -m megarl.rollout.router_entry", add_help=False)
    parser.add_argument("--parent-pid", type=int, required=True)
    args, router_args = parser.parse_known_args(argv)
    start_parent_watchdog(args.parent_pid)
    router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", *router_args], stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda signum, frame: router.send_signal(signal.SIGTERM))
    return router.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
