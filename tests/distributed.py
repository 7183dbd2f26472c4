"""Launch real multi-process runs (torchrun, gloo) from tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; raise with its output on failure."""
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-10000:]}"
        )
    return result


def run_torchrun(script: Path, args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes with torchrun; raise with its output on failure."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]
    # One thread per rank: the ranks share the machine's cores.
    return _run(command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, timeout)


def run_python(script: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` as a plain single process; raise with its output on failure."""
    return _run([sys.executable, str(script), *args], {**os.environ, "PYTHONWARNINGS": "ignore"}, timeout)


def run_python_source(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python ``source`` in a fresh interpreter; raise with its output on failure."""
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / "check.py"
        script.write_text(source)
        return run_python(script, [], timeout=timeout)
