"""One engine server: its URL, its process when megarl launched it, and calls to it.

Launched engines run in their own process group (so killing one kills everything it spawned,
e.g. SGLang's scheduler processes) and watch the launching process, exiting when it is gone
(:mod:`megarl.rollout.watchdog`), so no engine outlives the trainer even when the trainer is
killed outright. Their output goes to ``{log_dir}/{name}.log``; start-up errors quote its tail.

Calls go through the group's :class:`~megarl.rollout.http_client.EngineClient`, in three forms:
``await engine.call_async(...)`` on the client's loop, ``engine.submit(...)`` (a future) and
``engine.call(...)`` (blocking) from any other thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import torch

from megarl.rollout import engine_args, protocol
from megarl.rollout.errors import EngineDead, EngineError, EngineMisconfigured, EngineRequestError, EngineStartError, EngineTimeout
from megarl.rollout.http_client import EngineClient

_POLL_S = 0.1
_STOP_GRACE_S = 10.0
_LOG_TAIL_BYTES = 4000
_READY_PROBE_TIMEOUT_S = 5.0


EngineKind = Literal["hf", "sglang"]


def resolve_engine(engine: str) -> EngineKind:
    """``auto`` -> ``sglang`` when CUDA is present and SGLang is installed with its GPU kernels
    (``sgl_kernel``; its source alone, as tools/setup.sh installs it for tests, is not enough), else ``hf``."""
    if engine != "auto":
        return engine
    installed = all(importlib.util.find_spec(module) is not None for module in ("sglang", "sgl_kernel"))
    return "sglang" if torch.cuda.is_available() and installed else "hf"


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclasses.dataclass(kw_only=True, slots=True)
class LaunchOptions:
    """How megarl starts engine servers on this machine."""

    engine: Literal["hf", "sglang"]
    """``hf``: ``python -m megarl.rollout.embedded.server``; ``sglang``: ``python -m sglang.launch_server``."""
    model_path: str
    """HF model directory the engines start from."""
    log_dir: Path
    """Where each engine's output goes (``{name}.log``)."""
    tensor_parallel: int = 1
    """GPUs per SGLang engine (``--tp-size``); engine ``i`` uses GPUs ``first_gpu + i * tensor_parallel ...``."""
    first_gpu: int = 0
    """First GPU of engine 0 (``--base-gpu-id``)."""
    mem_fraction: float = 0.5
    """SGLang ``--mem-fraction-static``."""
    colocate: bool = True
    """SGLang ``--enable-memory-saver``, so release/resume memory frees GPU memory for training."""
    deterministic: bool = False
    """SGLang ``--enable-deterministic-inference``: needed for SGLang to honour per-sample seeds."""
    seed: int = 1
    """The server's own random seed (requests without a seed draw from it)."""
    host: str = "127.0.0.1"
    """Interface the servers listen on (``0.0.0.0`` when other nodes call them)."""
    address: str | None = None
    """The address the servers are called at (this node's, when they listen on every interface); None: ``host``."""
    hf_threads: int | None = None
    """torch threads of each ``hf`` engine; None keeps torch's default."""
    hf_step_delay_s: float = 0.0
    """Seconds each ``hf`` engine waits after every decoding step (a GPU engine's latency, modelled)."""
    dtype: str = "auto"
    """Model dtype: ``auto`` (the checkpoint's), ``bfloat16``, ``float32`` ..."""
    return_routed_experts: bool = False
    """``--enable-return-routed-experts`` (SGLang's flag, and the ``hf`` server's of the same name):
    the server captures the experts its router chooses and answers ``return_routed_experts``."""
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``rollout.engine_kwargs``: settings by SGLang ``ServerArgs`` name, on every server's command
    line (:func:`megarl.rollout.engine_args.command_line`)."""
    extra_args: tuple[str, ...] = ()
    """More command-line arguments for every server."""
    startup_timeout_s: float = 600.0
    """Limit from process start to a healthy server."""


class Engine:
    """One engine server.

    Args:
        name: e.g. ``hf-0``; used in every error and log line.
        kind: ``hf`` or ``sglang``.
        tensor_parallel: the engine's tensor-parallel size (ranks in a weight-update group).
        url: ``http://host:port`` of an engine megarl did not launch; None with ``launch``.
        launch: how to start (and restart) it; None for an engine given by URL.
        index: its position in its group (which GPUs it uses).
        remote: launched and supervised on another node (by that node's first rank): a caller
            here waits for it to come back rather than restart it.
    """

    def __init__(
        self, name: str, kind: str, tensor_parallel: int, *, url: str | None = None, launch: LaunchOptions | None = None, index: int = 0,
        remote: bool = False,
    ):
        self.name = name
        self.kind = kind
        self.tensor_parallel = tensor_parallel
        self.url = url
        self.launch = launch
        self.index = index
        self.remote = remote
        self.port: int | None = None
        """The port a launched engine listens on; a restart listens there again, so its URL stays
        valid for whoever holds it (the router, other nodes)."""
        self.process: subprocess.Popen | None = None
        self.incarnation = 0
        """Counts successful starts; a caller that saw incarnation ``k`` fail knows whether it was restarted since."""
        self.lock = threading.RLock()
        """Held while the engine is (re)started."""
        self.client: EngineClient | None = None
        """The HTTP client its calls go through; set by the :class:`~megarl.rollout.group.EngineGroup` that takes it."""

    @property
    def managed(self) -> bool:
        """Whether megarl launched it (and so can restart it)."""
        return self.launch is not None

    @property
    def log_path(self) -> Path | None:
        """Where a launched engine's output goes; None for an engine given by URL."""
        return None if self.launch is None else self.launch.log_dir / f"{self.name}.log"

    @property
    def label(self) -> str:
        """Name, URL and pid, for messages."""
        pid = f", pid {self.process.pid}" if self.process is not None else ""
        return f"{self.name} ({self.url or 'not started'}{pid})"

    async def call_async(self, method: str, path: str, body: Any = None, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
        """One request, on the client's loop; see :meth:`EngineClient.request_async` for the errors.

        A failed request to a launched engine whose process has exited raises :class:`EngineDead`.
        """
        if self.url is None:
            raise EngineDead(self.label, "it is not running")
        try:
            return await self._client().request_async(self.label, self.url, method, path, body, timeout=timeout, headers=headers)
        except (EngineTimeout, EngineRequestError):
            if self.exited():
                raise EngineDead(self.label, f"its process exited with code {self.process.returncode}") from None
            raise

    def submit(self, method: str, path: str, body: Any = None, *, timeout: float) -> concurrent.futures.Future:
        """:meth:`call_async` scheduled on the client's loop, from any thread; its future holds the answer or the error."""
        return self._client().run(self.call_async(method, path, body, timeout=timeout))

    def call(self, method: str, path: str, body: Any = None, *, timeout: float) -> Any:
        """:meth:`call_async`, waited for (from any thread but the client's loop)."""
        return self._client().wait(self.call_async(method, path, body, timeout=timeout))

    def _client(self) -> EngineClient:
        if self.client is None:
            raise RuntimeError(f"engine {self.name} belongs to no EngineGroup, so it has no client to call it with")
        return self.client

    def exited(self) -> bool:
        """Whether its launched process has exited."""
        return self.process is not None and self.process.poll() is not None

    def command(self, port: int, ready_file: Path) -> list[str]:
        """The server's command line: it listens on ``port``; the ``hf`` server given 0 picks its own and writes it to ``ready_file``."""
        options = self.launch
        if options.engine == "hf":
            command = [
                sys.executable, "-m", "megarl.rollout.embedded.server", "--model", options.model_path,
                "--host", options.host, "--port", str(port), "--ready-file", str(ready_file),
                "--seed", str(options.seed), "--dtype", options.dtype, "--parent-pid", str(os.getpid()),
            ]
            if options.hf_threads:
                command += ["--threads", str(options.hf_threads)]
            if options.hf_step_delay_s:
                command += ["--step-delay-s", str(options.hf_step_delay_s)]
        else:
            command = [
                sys.executable, "-m", "megarl.rollout.sglang_entry", "--parent-pid", str(os.getpid()),
                "--model-path", options.model_path, "--host", options.host, "--port", str(port),
                "--tp-size", str(options.tensor_parallel), "--base-gpu-id", str(options.first_gpu + self.index * options.tensor_parallel),
                "--mem-fraction-static", str(options.mem_fraction), "--random-seed", str(options.seed),
                "--dtype", options.dtype, "--skip-tokenizer-init",
            ]
            if options.colocate:
                command.append("--enable-memory-saver")
            if options.deterministic:
                command.append("--enable-deterministic-inference")
        if options.return_routed_experts:
            command.append("--enable-return-routed-experts")
        return command + engine_args.command_line(options.engine, options.engine_kwargs) + list(options.extra_args)

    def require_routed_experts(self, timeout: float) -> None:
        """Check, through ``/server_info`` (SGLang before it: ``/get_server_info``), that the engine
        returns routed experts.

        Raises:
            EngineMisconfigured: it does not (or does not say), with the fix.
        """
        for path in protocol.SERVER_INFO_PATHS:
            try:
                info = self.call("GET", path, timeout=timeout)
                break
            except EngineRequestError as error:
                if error.status != 404:
                    raise
        else:
            raise EngineMisconfigured(
                self.label, f"serves neither {protocol.SERVER_INFO} nor {protocol.SERVER_INFO_DEPRECATED}, so it cannot tell whether it "
                f"returns routed experts, which algorithm.routing_replay=r3 needs: {protocol.ROUTED_EXPERTS_FIX}"
            )
        refusal = protocol.routed_experts_refusal(path, info)
        if refusal is not None:
            raise EngineMisconfigured(self.label, refusal)

    def start(self) -> None:
        """Launch the server and wait until it is healthy.

        Raises:
            EngineStartError: it exited or stayed unhealthy for ``startup_timeout_s``; the message
                quotes its log.
        """
        options = self.launch
        options.log_dir.mkdir(parents=True, exist_ok=True)
        ready_file = options.log_dir / f"{self.name}.ready"
        ready_file.unlink(missing_ok=True)
        if self.port is not None:
            port = self.port
        else:
            port = 0 if options.engine == "hf" else free_port(options.host)
        address = options.address or options.host
        with open(self.log_path, "ab") as log:
            log.write(f"--- megarl: starting {self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(port, ready_file), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.url = None if port == 0 else f"http://{address}:{port}"
        deadline = time.monotonic() + options.startup_timeout_s
        while time.monotonic() < deadline:
            if self.exited():
                raise EngineStartError(self.label, f"exited with code {self.process.returncode} while starting\n{self.log_tail()}")
            if self.url is None and ready_file.exists():
                port = json.loads(ready_file.read_text())["port"]
                self.url = f"http://{address}:{port}"
            if self.url is not None:
                try:
                    self.call("GET", protocol.HEALTH, timeout=_READY_PROBE_TIMEOUT_S)
                except EngineError:
                    pass
                else:
                    self.port = port
                    self.incarnation += 1
                    return
            time.sleep(_POLL_S)
        self.kill()
        raise EngineStartError(self.label, f"not healthy within {options.startup_timeout_s:g} s (startup_timeout_s)\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The end of its log, for error messages."""
        return log_tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL its process group (works on a stopped process too) and reap it."""
        if self.process is None:
            return
        signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM its process group, then SIGKILL what is left after a grace period."""
        if self.process is not None:
            stop_group(self.process, _STOP_GRACE_S)


def log_tail(path: Path | None) -> str:
    """The end of a process's log (its last few thousand bytes), for error messages; empty without one."""
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as log:
        log.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
        return f"--- last lines of {path} ---\n" + log.read().decode(errors="replace")


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group ``process`` leads, SIGKILL what is left after ``grace_s``, and reap it."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    signal_group(process.pid, signal.SIGKILL)
    process.wait()


def signal_group(group: int, signum: int) -> None:
    """Send ``signum`` to process group ``group`` (gone already: nothing to do)."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass
