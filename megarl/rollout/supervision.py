"""Keeping engine servers alive: start-up, a health monitor, restarts within a budget, shutdown.

An :class:`EngineSupervisor` owns the engines' processes; the client
(:class:`megarl.rollout.group.EngineGroup`) sends its generation and memory requests through
:meth:`EngineSupervisor.call_async` (on the client's event loop), has engines that missed a
weight update restarted through :meth:`EngineSupervisor.recover`, and never restarts anything
itself.

Faults. A health monitor thread calls ``/health_generate`` on every engine each
``health_check_interval_s``; an engine that fails it within ``health_timeout_s`` (dead, or
stalled), or whose process dies under a request, is killed, restarted and brought up to the
current weights (the ``reload`` callback: the client loads its weight snapshot,
:mod:`megarl.rollout.snapshot`). A restart runs on the group's worker threads, never on the
event loop, so requests to the other engines keep flowing meanwhile. A request the engine held is
then sent again, and its per-sample seeds make the re-sent samples the ones the first attempt
would have drawn. Restarts count against ``restart_budget`` for the whole run; past it, the call
(and every later one) raises :class:`RestartBudgetExhausted`. Engines given by URL are not restarted: their failure raises
:class:`EngineDead`. The monitor is paused (:meth:`EngineSupervisor.paused`) during weight
updates and while memory is released.

Several nodes: each node's first rank supervises its node's engines (the budget is per node). The
first rank also generates on the other nodes' engines (``remote``): one that dies under a request
is waited for, up to ``remote_wait_s``, until its own node restarted it (on the same port) and it
holds the current weights (``/get_model_info``'s ``weight_version``); then the request goes again.
With a router in front of the engines, a restarted engine is removed from the router before it
is killed and added again once it holds the current weights.

Shutdown stops the monitor, then every launched engine; engines also exit by themselves when the
launching process dies (:mod:`megarl.rollout.watchdog`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Callable

from megarl.rollout import protocol
from megarl.rollout.engine import Engine
from megarl.rollout.errors import EngineDead, EngineError, RestartBudgetExhausted

log = logging.getLogger(__name__)

_REMOTE_POLL_S = 0.2
"""How often a failed remote engine is asked whether it is back."""


class EngineSupervisor:
    """Starts, watches and restarts a group's engines; see the module docstring.

    Args:
        engines: the engines (launched ones are started by :meth:`start` and restarted on failure).
        pool: threads for starting the engines concurrently and for restarts.
        reload: gives a freshly restarted engine the current weights (raises ``EngineError``).
        health_check_interval_s: seconds between health checks.
        health_timeout_s: limit of one health check.
        restart_budget: engine restarts allowed during the run.
        require_routed_experts: check that every engine returns routed experts once it is up
            (:meth:`Engine.require_routed_experts`: one given by URL may run without the flag).
        check_timeout_s: limit of that check.
        version: the weight version the engines hold (None before the first update): what a
            remote engine must report again before it is used after a failure.
        remote_wait_s: how long to wait for a remote engine to come back.
    """

    def __init__(
        self,
        engines: list[Engine],
        *,
        pool: concurrent.futures.Executor,
        reload: Callable[[Engine], None],
        health_check_interval_s: float,
        health_timeout_s: float,
        restart_budget: int,
        require_routed_experts: bool = False,
        check_timeout_s: float = 60.0,
        version: Callable[[], str | None] = lambda: None,
        remote_wait_s: float = 600.0,
    ):
        self.engines = engines
        self.health_check_interval_s = health_check_interval_s
        self.health_timeout_s = health_timeout_s
        self.restart_budget = restart_budget
        """Engine restarts allowed during the run (may be changed at any time)."""
        self.restarts = 0
        """Engine restarts so far."""
        self.closed = False
        """Set by :meth:`close`: nothing is restarted any more and every call raises."""
        self._pool = pool
        self._reload = reload
        self._require_routed_experts = require_routed_experts
        self._check_timeout_s = check_timeout_s
        self._version = version
        self._remote_wait_s = remote_wait_s
        self._router: Any = None
        self._restart_lock = threading.Lock()
        self._fatal: EngineError | None = None
        self._pauses = 0
        self._pause_lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        """Launch every engine megarl manages, concurrently, wait until all are healthy, check them
        (routed experts), then start the health monitor.

        Raises:
            EngineStartError: an engine did not come up (the caller stops the others).
            EngineMisconfigured: an engine does not return routed experts though they are required.
        """
        for start in [self._pool.submit(engine.start) for engine in self.engines if engine.managed]:
            start.result()
        if self._require_routed_experts:
            for engine in self.engines:
                engine.require_routed_experts(self._check_timeout_s)
        self._monitor = threading.Thread(target=self._watch, name="megarl-engine-health", daemon=True)
        self._monitor.start()

    async def call_async(self, engine: Engine, method: str, path: str, body: Any = None, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
        """One request, on the client's loop; a dead engine is restarted (with the current weights,
        on a worker thread) and the request sent again."""
        while True:
            self.check()
            incarnation = engine.incarnation
            try:
                return await engine.call_async(method, path, body, timeout=timeout, headers=headers)
            except EngineDead as error:
                await asyncio.get_running_loop().run_in_executor(self._pool, self.recover, engine, incarnation, error)

    def recover(self, engine: Engine, seen_incarnation: int, cause: EngineError) -> None:
        """Restart ``engine`` and reload the current weights, unless it was restarted since ``seen_incarnation``.

        A remote engine is waited for instead (see the module docstring).

        Raises:
            RestartBudgetExhausted: no restarts left (the group is then unusable).
            EngineDead: the engine was not launched by megarl, or a remote one did not come back.
            EngineStartError: the restarted engine did not come up.
        """
        with engine.lock:
            if engine.incarnation != seen_incarnation or self.closed:
                return
            self.check()
            if engine.remote:
                self._await_remote(engine, cause)
                return
            if not engine.managed:
                self._fatal = EngineDead(engine.label, f"failed and was not launched by megarl, so it cannot be restarted: {cause}")
                raise self._fatal
            with self._restart_lock:
                if self.restarts >= self.restart_budget:
                    self._fatal = RestartBudgetExhausted(
                        engine.label,
                        f"failed ({cause}) with every restart of the run's budget used "
                        f"({self.restarts} of rollout.restart_budget={self.restart_budget}); see its log {engine.log_path}",
                    )
                    raise self._fatal
                self.restarts += 1
            log.warning("restarting rollout engine %s (restart %d of %d): %s", engine.label, self.restarts, self.restart_budget, cause)
            try:
                if self._router is not None:
                    self._router.remove_worker(engine.url)
                engine.kill()
                engine.start()
                self._reload(engine)
                if self._router is not None:
                    self._router.add_worker(engine.url)
            except EngineError as error:
                self._fatal = error
                raise

    def _await_remote(self, engine: Engine, cause: EngineError) -> None:
        """Wait until a remote engine answers again with the current weights."""
        log.warning("rollout engine %s failed (%s); waiting for its node to restart it", engine.label, cause)
        deadline = time.monotonic() + self._remote_wait_s
        while time.monotonic() < deadline and not self.closed:
            try:
                info = engine.call("GET", protocol.MODEL_INFO, timeout=self.health_timeout_s)
                if self._version() in (None, info.get("weight_version")):
                    engine.call("GET", protocol.HEALTH_GENERATE, timeout=self.health_timeout_s)
                    engine.incarnation += 1
                    return
            except EngineError:
                pass
            time.sleep(_REMOTE_POLL_S)
        self._fatal = EngineDead(
            engine.label, f"failed ({cause}) and did not come back with the current weights within {self._remote_wait_s:g} s; "
            "its node's first rank restarts it: see that node's engine logs (run_dir/engines)"
        )
        raise self._fatal

    def re_register_with(self, router: Any) -> None:
        """Take a restarted engine out of ``router`` before it is killed, and add it again once it
        holds the current weights (``router``: a :class:`~megarl.rollout.router.Router`)."""
        self._router = router

    def check(self) -> None:
        """Raise the error that made the group unusable, if any.

        Raises:
            EngineError: an engine failed for good earlier (the same error again).
            RuntimeError: the group was shut down.
        """
        if self._fatal is not None:
            raise self._fatal
        if self.closed:
            raise RuntimeError("this EngineGroup was shut down")

    def pause(self) -> None:
        """Suspend health checks until the matching :meth:`resume` (pauses nest)."""
        with self._pause_lock:
            self._pauses += 1

    def resume(self) -> None:
        """End one :meth:`pause`."""
        with self._pause_lock:
            self._pauses -= 1

    @contextlib.contextmanager
    def paused(self):
        """No health checks inside the block."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def health(self) -> dict[str, bool]:
        """Whether each engine answers ``/health_generate`` within ``health_timeout_s`` (no restarts)."""
        checks = {engine.name: engine.submit("GET", protocol.HEALTH_GENERATE, timeout=self.health_timeout_s) for engine in self.engines}
        return {name: _passed(check) for name, check in checks.items()}

    def pids(self) -> dict[str, int]:
        """Process id of every launched engine's server."""
        return {engine.name: engine.process.pid for engine in self.engines if engine.process is not None}

    def close(self) -> None:
        """Stop restarting: later calls raise, and the health monitor ends."""
        self.closed = True
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.health_timeout_s + 1)

    def stop_engines(self) -> None:
        """Stop every launched engine (after :meth:`close`)."""
        for engine in self.engines:
            if engine.managed:
                with engine.lock:
                    engine.stop()

    def _watch(self) -> None:
        """Health monitor: restart every engine that fails ``/health_generate``."""
        while not self._stop.wait(self.health_check_interval_s):
            if self._pauses or self._fatal is not None:
                continue
            idle = [engine for engine in self.engines if _not_restarting(engine)]
            incarnations = {engine: engine.incarnation for engine in idle}
            try:
                checks = {engine: engine.submit("GET", protocol.HEALTH_GENERATE, timeout=self.health_timeout_s) for engine in idle}
                errors = {engine: check.exception() for engine, check in checks.items()}
            except (concurrent.futures.CancelledError, RuntimeError):
                # The group is shutting down: its client closed (or cancelled the checks) under us.
                if self._stop.is_set():
                    return
                raise
            for engine, error in errors.items():
                if error is None or self._pauses or self._stop.is_set():
                    continue
                try:
                    self.recover(engine, incarnations[engine], error)
                except EngineError:
                    return


def _passed(check: concurrent.futures.Future) -> bool:
    """Whether a health check answered; an error that is not the engine's is raised."""
    error = check.exception()
    if error is not None and not isinstance(error, EngineError):
        raise error
    return error is None


def _not_restarting(engine: Engine) -> bool:
    if not engine.lock.acquire(blocking=False):
        return False
    engine.lock.release()
    return True
