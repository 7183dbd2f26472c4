"""sglang-router (PyPI ``sglang-router``, 0.3.2) in front of a group's engines, as a process megarl runs.

::

    router = Router.launch(log_dir=run_dir / "engines")     # no workers yet; Router.connect(url) elsewhere
    router.add_worker("http://127.0.0.1:30001", timeout_s=60)
    answer = urllib.request.urlopen(router.url + "/generate", ...)   # routed to one worker
    router.remove_worker("http://127.0.0.1:30001")
    router.stop()

The router process (``python -m megarl.rollout.router_entry``) runs in its own session and kills
its process group when the launching process is gone, like the engines
(:mod:`megarl.rollout.watchdog`); :meth:`Router.stop` also runs at exit. Its output goes to
``{log_dir}/router.log``.

What the router does with requests (measured with 0.3.2): ``/generate`` is parsed and re-sent, so
a body must have ONE ``sampling_params`` dict (a list is refused with 422) and one ``rid`` string
(:func:`megarl.rollout.protocol.routed_generate_body`: one request per sample); unknown fields are dropped, among them
``return_routed_experts`` (so routing replay R3 cannot run behind it: :mod:`megarl.preflight` refuses
it). ``/flush_cache`` reaches every worker.
Weight updates, memory release, pause / continue and ``/abort_request`` are not routed (404): they
go to the engines directly. The ``X-SMG-Routing-Key`` header keeps requests with one key on one
worker under ``--policy manual``; other policies ignore it.

Workers are registered at run time (``POST /workers``, asynchronous: :meth:`Router.add_worker`
waits until the router lists the worker healthy). The router probes a new worker's ``/health``,
then ``/server_info`` (or ``/get_server_info``) and ``/model_info`` (or ``/get_model_info``) for
its ``model_path``; it also tries an HTTP/2 connection first, which an HTTP/1 server such as the
``hf`` engine's logs as "Invalid HTTP request received." (harmless). A worker the router finds
unhealthy later stays listed (``is_healthy: false``) until it is removed.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from megarl.rollout.engine import free_port, log_tail, stop_group
from megarl.rollout.errors import EngineDead, EngineMisconfigured, EngineRequestError, EngineStartError, EngineTimeout

PACKAGE = "sglang-router"
VERSION = "0.3.2"
"""The version megarl's lock pins and whose behaviour this module describes."""
INSTALL_HINT = f"pip install {PACKAGE}=={VERSION} (or run tools/setup.sh)"
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
"""Requests with the same key go to the same worker under ``--policy manual``."""
WORKERS = "/workers"

DEFAULT_ARGS = ("--balance-abs-threshold", "10", "--balance-rel-threshold", "1.2", "--log-level", "warn")
"""Defaults that ``extra_args`` may override (the router's argparse keeps a repeated flag's last
value). The balance thresholds are slime's: under ``cache_aware``, a shared chat-template prefix
otherwise piles different prompts onto one worker until the router's own thresholds (64, 1.5)
trip. ``warn``: at ``info`` the router logs two lines per request."""
POLICIES = ("cache_aware", "round_robin", "random", "manual")
"""``--policy`` values a router without workers at start accepts (``power_of_two`` needs two)."""
FIXED_ARGS = ("--host", "--port", "--worker-urls")
"""Flags :meth:`Router.launch` sets itself: the router's address must be the one megarl calls, and
workers are added at run time."""

_POLL_S = 0.05
_STOP_GRACE_S = 5.0
_PROBE_TIMEOUT_S = 5.0
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
"""The router colours its log whatever the terminal (``NO_COLOR`` is ignored); quoted logs drop it."""


def _request(label: str, url: str, method: str, path: str, body: Any = None, *, timeout: float) -> Any:
    """One JSON request; the decoded answer (its text when it is not JSON, None when empty).

    Raises:
        EngineTimeout: no answer within ``timeout`` seconds.
        EngineDead: the connection was refused or reset.
        EngineRequestError: an HTTP error status.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        raise EngineRequestError(label, f"{method} {path} answered {error.code}: {detail[:500]}", status=error.code) from None
    except TimeoutError:
        raise EngineTimeout(label, f"{method} {path}: no answer within {timeout:g} s") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise EngineTimeout(label, f"{method} {path}: no connection within {timeout:g} s") from None
        raise EngineDead(label, f"{method} {path}: {error.reason}") from None
    except ConnectionError as error:
        raise EngineDead(label, f"{method} {path}: {error}") from None
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def fixed_args(extra_args: Sequence[str]) -> list[str]:
    """The arguments among ``extra_args`` that set one of :data:`FIXED_ARGS` (``--port 9000`` or ``--port=9000``)."""
    return [arg for arg in extra_args if arg.split("=", 1)[0] in FIXED_ARGS]


def router_version() -> str:
    """The installed sglang-router's version.

    Raises:
        EngineMisconfigured: it is not installed, with the command that installs it.
    """
    if importlib.util.find_spec("sglang_router") is None:
        raise EngineMisconfigured(PACKAGE, f"rollout.router: sglang needs the {PACKAGE} package, which is not installed: {INSTALL_HINT}")
    return importlib.metadata.version(PACKAGE)


class Router:
    """An sglang-router: one this process launched (:meth:`launch`), or one it only calls
    (:meth:`connect`); see the module docstring.

    Args:
        url: ``http://host:port`` the router serves.
        process: the ``router_entry`` process (leader of the router's process group) when this
            process launched it; stopped at exit.
        log_path: where a launched router's output goes.
    """

    def __init__(self, url: str, *, process: subprocess.Popen | None = None, log_path: Path | None = None):
        self._url = url
        self.process = process
        self.log_path = log_path
        self._stopped = process is None
        if process is not None:
            atexit.register(self.stop)

    @classmethod
    def connect(cls, url: str) -> Router:
        """The router at ``url``, launched elsewhere (by the first rank, for another node's engines):
        its workers can be added and removed; :meth:`stop` leaves it running."""
        return cls(url.rstrip("/"))

    @classmethod
    def launch(
        cls,
        *,
        policy: str = "cache_aware",
        extra_args: Sequence[str] = (),
        log_dir: Path,
        host: str = "127.0.0.1",
        address: str | None = None,
        startup_timeout_s: float = 60.0,
        request_timeout_s: float = 600.0,
    ) -> Router:
        """Start a router with no workers on a free port and wait until it answers ``/health``.

        Args:
            policy: ``--policy``: ``cache_aware`` (sglang-router's default: a prompt's samples to
                the worker that holds its prefix, unless the loads are out of balance),
                ``round_robin``, ``random``, ``manual`` (sticky by :data:`ROUTING_KEY_HEADER`);
                not ``power_of_two``, which refuses to start with fewer than two workers.
            extra_args: more ``sglang_router.launch_router`` arguments; they override
                :data:`DEFAULT_ARGS` and the free ``--prometheus-port``; never
                :data:`FIXED_ARGS`.
            log_dir: where ``router.log`` goes.
            host: the interface it listens on (``0.0.0.0``: every one); workers must be
                reachable from it.
            address: the host in :attr:`url`, where other nodes reach it (this node's address when
                ``host`` is ``0.0.0.0``); None: ``host``.
            startup_timeout_s: limit from process start to ``/health`` 200.
            request_timeout_s: ``--request-timeout-secs`` (whole seconds, rounded up): the router's
                limit on one request to a worker.

        Raises:
            EngineMisconfigured: sglang-router is not installed.
            ValueError: ``policy`` is not one of :data:`POLICIES`, or ``extra_args`` sets one of
                :data:`FIXED_ARGS`.
            EngineStartError: the router exited, or did not answer, in time; the message quotes its log.
        """
        version = router_version()
        if policy not in POLICIES:
            raise ValueError(
                f"rollout.router_policy: {policy!r} is not one of {list(POLICIES)} (power_of_two: sglang-router refuses to start it "
                "without workers, and megarl adds them after the start)"
            )
        fixed = fixed_args(extra_args)
        if fixed:
            raise ValueError(f"rollout.router_args: {fixed} are set by megarl (Router.launch: host, a free port, workers added at run time); remove them")
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "router.log"
        port = free_port(host)
        command = [
            sys.executable, "-m", "megarl.rollout.router_entry", "--parent-pid", str(os.getpid()),
            "--policy", policy, "--prometheus-port", str(free_port(host)), "--shutdown-grace-period-secs", "1",
            "--disable-circuit-breaker", "--request-timeout-secs", str(math.ceil(request_timeout_s)),
            *DEFAULT_ARGS, *extra_args, "--host", host, "--port", str(port),
        ]
        with open(log_path, "ab") as log:
            log.write(f"--- megarl: starting {PACKAGE} {version} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        router = cls(f"http://{address or host}:{port}", process=process, log_path=log_path)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                router.stop()
                raise EngineStartError(router.label, f"exited with code {process.returncode} while starting\n{router.log_tail()}")
            try:
                router._call("GET", "/health", timeout=_PROBE_TIMEOUT_S)
                return router
            except (EngineDead, EngineTimeout, EngineRequestError):
                time.sleep(_POLL_S)
        router.stop()
        raise EngineStartError(router.label, f"did not answer /health within {startup_timeout_s:g} s (startup_timeout_s)\n{router.log_tail()}")

    @property
    def url(self) -> str:
        """``http://host:port`` of the router: send ``/generate`` (and ``/flush_cache``) here."""
        return self._url

    @property
    def label(self) -> str:
        """Name, URL and (for a launched router) pid, for messages."""
        pid = f", pid {self.process.pid}" if self.process is not None else ""
        return f"{PACKAGE} ({self._url}{pid})"

    def _call(self, method: str, path: str, body: Any = None, *, timeout: float) -> Any:
        return _request(self.label, self._url, method, path, body, timeout=timeout)

    def _listed(self, timeout: float) -> list[dict]:
        return self._call("GET", WORKERS, timeout=timeout)["workers"]

    def workers(self, timeout_s: float = _PROBE_TIMEOUT_S) -> dict[str, bool]:
        """Every worker the router lists: URL -> whether it counts it healthy."""
        return {worker["url"]: bool(worker["is_healthy"]) for worker in self._listed(timeout_s)}

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None:
        """Register the engine at ``url`` and wait until the router lists it healthy (a listed URL
        is not posted again: the router would refuse it, logging an error).

        Raises:
            EngineStartError: not listed healthy within ``timeout_s`` (the router could not reach
                its ``/health``); the message names the URL and quotes the router's log.
        """
        url = url.rstrip("/")
        deadline = time.monotonic() + timeout_s
        if url not in self.workers(timeout_s):
            self._call("POST", WORKERS, {"url": url}, timeout=timeout_s)
        while not self.workers(timeout_s=max(deadline - time.monotonic(), _POLL_S)).get(url, False):
            if time.monotonic() > deadline:
                raise EngineStartError(
                    self.label, f"worker {url} was not listed healthy within {timeout_s:g} s: is an engine serving /health there?\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def remove_worker(self, url: str, timeout_s: float = 10.0) -> None:
        """Unregister the worker at ``url`` and wait until the router no longer lists it (nothing
        to do when it is not listed).

        Raises:
            EngineTimeout: still listed after ``timeout_s``.
        """
        url = url.rstrip("/")
        deadline = time.monotonic() + timeout_s
        for worker in self._listed(timeout_s):
            if worker["url"] == url:
                self._call("DELETE", f"{WORKERS}/{urllib.parse.quote(str(worker['id']), safe='')}", timeout=timeout_s)
        while url in self.workers(timeout_s=max(deadline - time.monotonic(), _POLL_S)):
            if time.monotonic() > deadline:
                raise EngineTimeout(self.label, f"worker {url} still listed {timeout_s:g} s after DELETE {WORKERS}/<its id>")
            time.sleep(_POLL_S)

    def log_tail(self) -> str:
        """The end of a launched router's log, for error messages (its colour codes dropped)."""
        return _ANSI_ESCAPE.sub("", log_tail(self.log_path))

    def stop(self) -> None:
        """SIGTERM a launched router's process group, SIGKILL what is left after a few seconds.
        Idempotent; nothing for a connected router."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        stop_group(self.process, _STOP_GRACE_S)


def undelivered(error: EngineRequestError) -> bool:
    """Whether the router answered ``error`` because it could not reach an engine (one died and is
    not yet taken out, or none is healthy: HTTP 503; sglang-router 0.3.2 answers a request it could
    not send with HTTP 500 "error sending request for url ..."), not because an engine refused it."""
    return error.status == 503 or (error.status is not None and error.status >= 500 and "error sending request" in str(error))
