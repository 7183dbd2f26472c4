"""Launch real multi-process runs (torchrun, gloo) from tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {"PYTHONWARNINGS": "ignore"}
TORCHRUN_ENVIRONMENT = {**ENVIRONMENT, "OMP_NUM_THREADS": "1"}
"""One thread per rank: the ranks share the machine's cores."""
WORKERS = REPO / "tests" / "workers"
AGENT_PLAYERS = {
    # An environment; its episodes count their tool calls (env/tool_calls).
    "environment": [f"agent.environment={WORKERS / 'agent_env.py'}:ToolThenAnswer"],
    # An agent program over the OpenAI API: the endpoint records each call's sampled ids.
    "openai_agent": [f"agent.openai_agent={WORKERS / 'agent_program.py'}:lookup_agent", "agent.tool_parser=compact", "data.apply_chat_template=false"],
}
"""The overrides of the two ways the end-to-end tests play multi-turn episodes, by name."""


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` every 50 ms for up to ``timeout_s``; whether it came true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
    ]


def launch(
    command: list[str], environment: dict[str, str], timeout: float, interrupt_when: Callable[[], bool] | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root in a process group of its own, killed whole once
    the command ends (nothing it started outlives it), when it outlives ``timeout`` (the return
    code is then -9 and the output ends with a line saying so), or when the test is interrupted.
    The output goes through files, not pipes: a process left behind would hold a pipe open.

    ``interrupt_when``: polled while the command runs; once it returns True the group gets SIGINT,
    as a terminal's Ctrl-C sends it to the foreground group.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **environment}, stdout=stdout, stderr=stderr, text=True,
            start_new_session=True,
        )
        timed_out = False
        deadline = time.monotonic() + timeout
        try:
            while interrupt_when is not None and process.poll() is None and time.monotonic() < deadline:
                if interrupt_when():
                    os.killpg(process.pid, signal.SIGINT)
                    break
                time.sleep(0.05)
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if timed_out:
        errors += f"\n[killed after {timeout:g} s]"
    return subprocess.CompletedProcess(command, process.returncode, output, errors)


def run_together(commands: list[list[str]], environment: dict[str, str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` at the same time (e.g. one torchrun per "node"), each as :func:`launch` runs
    one; once one fails or ``timeout`` passes, every process group still running is killed."""
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+"))) for _ in commands]
        processes = [
            subprocess.Popen(command, cwd=REPO, env={**os.environ, **environment}, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
            for command, (stdout, stderr) in zip(commands, outputs)
        ]
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and any(process.poll() is None for process in processes):
                if any(process.poll() not in (None, 0) for process in processes):
                    break
                time.sleep(0.1)
        finally:
            for process in processes:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        results = []
        for command, process, (stdout, stderr) in zip(commands, processes, outputs):
            stdout.seek(0)
            stderr.seek(0)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read()))
    return results


def _run(command: list[str], environment: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; raise with its output on failure."""
    result = launch(command, environment, timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-10000:]}"
        )
    return result


def run_torchrun(script: Path, args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes with torchrun; raise with its output on failure."""
    return _run([*torchrun_command(nproc), str(script), *args], TORCHRUN_ENVIRONMENT, timeout)


def run_python(script: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` as a plain single process; raise with its output on failure."""
    return _run([sys.executable, str(script), *args], ENVIRONMENT, timeout)


def run_python_source(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python ``source`` in a fresh interpreter; raise with its output on failure."""
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / "check.py"
        script.write_text(source)
        return run_python(script, [], timeout=timeout)
