"""Engine processes die with the process that launched them, even when it is killed outright."""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5
"""How often an engine checks that its launcher is alive."""


def _parent_alive(parent_pid: int) -> bool:
    if os.getppid() != parent_pid:
        return False  # re-parented: the launcher is gone even if its pid was reused
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_parent_watchdog(parent_pid: int) -> None:
    """Kill this process's group (itself and its children) once ``parent_pid`` is gone.

    Engines are launched as process-group leaders (``start_new_session``), so the group holds the
    engine and whatever it spawned (SGLang's scheduler processes) and nothing of the launcher's.
    """

    def watch():
        while _parent_alive(parent_pid):
            time.sleep(POLL_S)
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
