"""Worker processes that never outlive their pool, shared by the environment workers
(:mod:`megarl.agents.workers`) and the agent program workers (:mod:`megarl.agents.programs`).

Each worker runs in a session of its own and holds the read end of the pool's *lifeline* pipe; a
thread of the worker (:func:`become_worker`) blocks on it (:func:`die_with_pool`) and kills the worker's whole process
group when it reads EOF: when the pool closes it (:func:`shut_down`), or when the pool's process is
gone, even by SIGKILL. The pool kills a worker with :func:`kill_group`, which takes what the
user's code started along.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Protocol

START_TIMEOUT_S = 60.0
"""How long a worker may take to start and import the user's file (an environment or an agent
program), which may import heavy libraries (torch alone takes seconds on a loaded machine)."""

JOIN_TIMEOUT_S = 5.0
"""How long closing waits for a killed worker to be reaped."""

EXIT_CODE_WAIT_S = 1.0
"""How long a dead worker's exit code is awaited, for the failure message, after its pipe closed."""


class KillableWorker(Protocol):
    process: Any

    def kill(self) -> None: ...


def become_worker(lifeline) -> None:
    """The first thing a worker's main does: a process group of its own (killing the group takes
    whatever the user's code started), Ctrl-C ignored (the run that owns it stops it), and a thread
    that kills the group once the pool's end of ``lifeline`` closes (:func:`die_with_pool`)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=die_with_pool, args=(lifeline,), name="pool-lifeline", daemon=True).start()


def die_with_pool(lifeline) -> None:
    """In a worker: block until the pool's end of ``lifeline`` closes (the pool closed, or its
    process is gone), then kill this worker's process group."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os.killpg(os.getpid(), signal.SIGKILL)


def kill_group(process) -> None:
    """SIGKILL ``process``'s group (the worker and what its user code started), else the process
    alone if it has not made its own group yet; never waits."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.kill()


def shut_down(workers: list[KillableWorker], retired: list, lifeline_ends: tuple) -> None:
    """Close a pool: close both ends of its lifeline (each worker's lifeline thread reads EOF and
    kills its group), kill every worker, and reap them and the ``retired`` processes killed earlier."""
    for end in lifeline_ends:
        end.close()
    for worker in workers:
        worker.kill()
    for process in [worker.process for worker in workers] + retired:
        process.join(timeout=JOIN_TIMEOUT_S)
