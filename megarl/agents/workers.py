"""Environment workers: episodes hosted in worker processes, called from an asyncio event loop.

Environments are user code that can raise, hang, kill their process or return nonsense, and an
episode loop runs many episodes at once on one event loop. :class:`EnvironmentPool` keeps every
such failure to the one episode it happened in, and never blocks the loop:

- ``num_workers`` processes (spawned, each its own session so that a kill takes whatever it
  started; Ctrl-C ignored) load the environment class once and host many episodes each, one
  instance per episode; an episode lives on the worker that had the fewest open episodes when it
  was reset.
- One request at a time per worker (an ``asyncio.Lock`` each) over a pipe; the event loop wakes on
  the pipe or the process's exit (``add_reader``), so a call costs one round trip and no thread.
- An episode whose ``reset``/``step`` raises or returns something invalid fails with kind
  ``error`` (the worker drops that instance and carries on); one that takes longer than
  ``step_timeout_s`` fails with ``timeout`` and its worker is killed and replaced; one whose worker
  dies fails with ``died`` and the worker is replaced.
- The other episodes of a replaced worker do not fail: before their next call the replacement
  rebuilds them by replaying their history (``reset(row)``, then ``step`` with each earlier model
  turn, results discarded). A replay that fails or overruns fails its episode with ``replay``.
- A call cancelled by its caller closes its episode; the answer it would have received is read
  and dropped before the worker's next request (or the worker is replaced if it never comes).
- Every wait has a deadline. Workers die with the pool: :meth:`EnvironmentPool.close` (also on
  garbage collection and at exit) kills them, and a worker whose pool's process is gone (even
  killed outright) kills itself and everything it started.

Failures are counted per kind; :meth:`EnvironmentPool.counts` returns the counts since its last call.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import multiprocessing
import multiprocessing.connection
import pickle
import time
import weakref
from typing import Any

from megarl.agents.environment import ENVIRONMENTS, EnvironmentLoadError, Messages, StepResult
from megarl.agents.processes import EXIT_CODE_WAIT_S, START_TIMEOUT_S, kill_group, shut_down
from megarl.agents.worker_process import serve

KINDS = ("error", "timeout", "died", "replay")
"""How an episode can fail: its environment raised or returned something invalid; a call took
longer than ``step_timeout_s``; its worker process died; rebuilding it on a replacement failed."""

_EXIT_CODE_POLL_S = 0.002


class EpisodeFailure(RuntimeError):
    """One episode failed (its kind is one of :data:`KINDS`); the pool and its other episodes go on."""

    def __init__(self, episode_id: str, kind: str, message: str):
        super().__init__(f"episode {episode_id!r} failed ({kind}): {message}")
        self.episode_id = episode_id
        self.kind = kind
        self.message = message


class _WorkerLost(Exception):
    """A worker did not answer in time, or died; ``kind`` is ``timeout`` or ``died``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Worker:
    """One worker process, the pool's end of its request pipe, and the message it owes: ``ready``
    after its start, ``reply`` while a request is out (or after its caller was cancelled)."""

    def __init__(self, context, arguments: tuple, lifeline, slot: int):
        self.connection, worker_end = context.Pipe()
        self.process = context.Process(target=serve, args=(*arguments, worker_end, lifeline), name=f"megarl-environment-{slot}", daemon=True)
        self.process.start()
        worker_end.close()  # so that the pool's end reads EOF once the worker is gone
        self.owe("ready", START_TIMEOUT_S)

    def owe(self, what: str, timeout_s: float) -> None:
        self.owed, self.timeout_s, self.deadline = what, timeout_s, time.monotonic() + timeout_s

    def kill(self) -> None:
        """SIGKILL its process group (itself and what it started), else the process alone if it
        has not yet made its own group; never waits."""
        kill_group(self.process)
        self.connection.close()


@dataclasses.dataclass(slots=True)
class _Episode:
    row: dict
    """The dataset row it was reset with."""
    slot: int
    """The position of the worker that hosts it."""
    model_turns: list[str] = dataclasses.field(default_factory=list)
    """The model turns stepped so far (not the last one, which ends it): what a replay repeats."""
    started: bool = False
    """Whether its reset has been answered: only started episodes need rebuilding."""
    stale: bool = False
    """Its worker was replaced since it was started: replay it before its next call."""


class EnvironmentPool:
    """Episodes of the environment ``spec`` (:func:`megarl.agents.environment.load_environment_class`)
    in ``num_workers`` worker processes, each instance created as ``EnvironmentClass(**env_kwargs)``.

    The constructor blocks until every worker has loaded the class (at most
    :data:`START_TIMEOUT_S`). The async methods are called from one event loop at a time; a call
    waits for its worker's previous request, and then at most ``step_timeout_s`` for its own.

    Raises:
        EnvironmentLoadError: the environment cannot be loaded (the first worker's message), its
            ``env_kwargs`` do not fit it or cannot be sent to a process, or its tools are invalid.
        ValueError: ``num_workers`` below 1 or ``step_timeout_s`` not positive.
    """

    def __init__(self, spec: str, *, env_kwargs: dict[str, Any] | None = None, num_workers: int = 2, step_timeout_s: float = 30.0):
        if num_workers < 1:
            raise ValueError(f"EnvironmentPool: num_workers is {num_workers}; it must be at least 1")
        if not step_timeout_s > 0:
            raise ValueError(f"EnvironmentPool: step_timeout_s is {step_timeout_s}; it must be positive (seconds)")
        self.spec = spec
        self.step_timeout_s = step_timeout_s
        env_kwargs = dict(env_kwargs or {})
        try:
            pickle.dumps(env_kwargs)
        except Exception as error:  # noqa: BLE001 - any pickling failure
            raise EnvironmentLoadError(f"agent.environment = {spec!r}: env_kwargs {env_kwargs!r:.200} cannot be sent to the worker processes: {error}") from None
        registered = ENVIRONMENTS.get(spec)
        self._worker_arguments = (spec, registered.__module__ if registered is not None else None, env_kwargs)
        self._context = multiprocessing.get_context("spawn")
        self._lifeline_worker_end, lifeline = self._context.Pipe(duplex=False)
        self._workers: list[_Worker] = []
        self._retired: list = []
        """Killed worker processes not yet reaped."""
        self._finalizer = weakref.finalize(self, shut_down, self._workers, self._retired, (lifeline, self._lifeline_worker_end))
        self._episodes: dict[str, _Episode] = {}
        self._load = [0] * num_workers
        """Open episodes per worker."""
        self._counts = dict.fromkeys(KINDS, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: list[asyncio.Lock] = []
        self.replaced = 0
        """Workers killed and replaced so far (hung or dead)."""
        try:
            self._workers.extend(self._start_worker(slot) for slot in range(num_workers))
            self.environment_name, self._schemas = self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    def _start_worker(self, slot: int) -> _Worker:
        return _Worker(self._context, self._worker_arguments, self._lifeline_worker_end, slot)

    def _wait_until_ready(self) -> tuple[str, list[dict]]:
        """Every worker's start-up answer; raises the first failure (once, for all workers)."""
        where = f"agent.environment = {self.spec!r}"
        waiting = {worker.connection: worker for worker in self._workers}
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise EnvironmentLoadError(f"{where}: {len(waiting)} environment worker(s) did not load it within {START_TIMEOUT_S:g} s")
            for connection in ready:
                worker = waiting.pop(connection)
                try:
                    status, value = connection.recv()
                except EOFError:
                    worker.process.join(timeout=EXIT_CODE_WAIT_S)
                    raise EnvironmentLoadError(f"{where}: an environment worker exited while loading it (exit code {worker.process.exitcode})") from None
                if status == "error":
                    raise EnvironmentLoadError(value)
                worker.owed = None
        return value

    # -- public API ----------------------------------------------------------------------------

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The JSON schemas of the environment's tools (its class's ``tools``), for the prompt."""
        return copy.deepcopy(self._schemas)

    def counts(self) -> dict[str, int]:
        """Episodes failed per kind (every one of :data:`KINDS`) since the previous call."""
        counts, self._counts = self._counts, dict.fromkeys(KINDS, 0)
        return counts

    @property
    def alive(self) -> int:
        """Worker processes alive now."""
        return sum(worker.process.is_alive() for worker in self._workers)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, to watch them from outside."""
        return [worker.process.pid for worker in self._workers]

    @property
    def open_episodes(self) -> int:
        """Episodes reset and not yet done, failed or closed."""
        return len(self._episodes)

    async def reset(self, episode_id: str, row: dict[str, Any]) -> Messages | None:
        """Start episode ``episode_id`` on the least-loaded worker: a new instance's ``reset(row)``.

        Returns:
            The first observation: chat messages replacing the row's prompt, or None for the
            row's prompt as the dataset renders it.

        Raises:
            EpisodeFailure: the episode failed (it is closed).
            ValueError: ``episode_id`` is already open.
        """
        self._check_open()
        if episode_id in self._episodes:
            raise ValueError(f"episode {episode_id!r} is already open: close it or use a new id")
        slot = min(range(len(self._workers)), key=lambda position: (self._load[position], position))
        episode = self._episodes[episode_id] = _Episode(row=row, slot=slot)
        self._load[slot] += 1
        observation = await self._call(episode_id, ("reset", episode_id, row))
        episode.started = True
        return observation

    async def step(self, episode_id: str, model_turn: str) -> StepResult:
        """The episode's ``step(model_turn)``; an episode that is done is closed.

        Raises:
            EpisodeFailure: the episode failed (it is closed).
            KeyError: ``episode_id`` is not open.
        """
        self._check_open()
        episode = self._episode(episode_id)
        result = await self._call(episode_id, ("step", episode_id, model_turn))
        if result.done:
            self._forget(episode_id)
        else:
            episode.model_turns.append(model_turn)
        return result

    async def close_episode(self, episode_id: str) -> None:
        """Drop the episode's instance (an episode ended by the loop: max turns, max tokens).
        Closing one that is done, failed or already closed does nothing."""
        episode = self._episodes.get(episode_id)
        if episode is not None:
            self._forget(episode_id)
            self._send_close(episode.slot, episode_id)

    def close(self) -> None:
        """Kill every worker (and whatever it started) and reap them; idempotent."""
        self._finalizer()

    def __enter__(self) -> EnvironmentPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the calls -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"the environment pool of {self.spec!r} is closed")

    def _episode(self, episode_id: str) -> _Episode:
        try:
            return self._episodes[episode_id]
        except KeyError:
            raise KeyError(f"episode {episode_id!r} is not open (never reset, or already done, failed or closed)") from None

    def _forget(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id, None)
        if episode is not None:
            self._load[episode.slot] -= 1

    def _send_close(self, slot: int, episode_id: str) -> None:
        """Tell the worker to drop an instance; nothing answers. A broken pipe means the worker is
        gone, and the instance with it."""
        try:
            self._workers[slot].connection.send(("close", episode_id))
        except (OSError, ValueError):
            pass

    def _lock(self, slot: int) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # locks belong to one loop: a new loop gets new ones
            self._loop, self._locks = loop, [asyncio.Lock() for _ in self._workers]
        return self._locks[slot]

    async def _call(self, episode_id: str, request: tuple) -> Any:
        """Send ``request`` for the episode to its worker, rebuilding the episode first if the
        worker was replaced; its answer's value, or the episode fails."""
        episode = self._episodes[episode_id]
        slot = episode.slot
        try:
            async with self._lock(slot):
                await self._settle(slot, episode_id)
                if episode.stale:
                    timeout_s = self.step_timeout_s * (1 + len(episode.model_turns))
                    status, value = await self._exchange(slot, ("replay", episode_id, episode.row, episode.model_turns), timeout_s, episode_id, "replay")
                    if status == "error":
                        raise EpisodeFailure(episode_id, "replay", f"rebuilding it on a replaced worker failed: {value}")
                    episode.stale = False
                status, value = await self._exchange(slot, request, self.step_timeout_s, episode_id, None)
                if status == "error":
                    raise EpisodeFailure(episode_id, "error", value)
        except EpisodeFailure as failure:
            self._counts[failure.kind] += 1
            self._forget(episode_id)
            raise
        except asyncio.CancelledError:
            self._forget(episode_id)
            self._send_close(slot, episode_id)
            raise
        return value

    async def _exchange(self, slot: int, request: tuple, timeout_s: float, episode_id: str, lost_kind: str | None) -> tuple[str, Any]:
        """One round trip with the worker at ``slot`` (its lock held); a worker that overruns
        ``timeout_s`` or dies is replaced and the episode fails (kind ``lost_kind``, else
        ``timeout`` or ``died``)."""
        worker = self._workers[slot]
        try:
            worker.connection.send(request)
            worker.owe("reply", timeout_s)
            reply = await self._receive(worker)
        except (OSError, _WorkerLost) as error:
            kind = error.kind if isinstance(error, _WorkerLost) else "died"
            self._replace(slot)
            verb = "rebuilding it" if request[0] == "replay" else f"{self.environment_name}.{request[0]}"
            problem = f"did not answer within {timeout_s:g} s" if kind == "timeout" else f"ended with its worker process, which died ({error})"
            raise EpisodeFailure(episode_id, lost_kind or kind, f"{verb} {problem}; the worker was killed and replaced") from None
        worker.owed = None
        return reply

    async def _settle(self, slot: int, episode_id: str) -> None:
        """Read what the worker at ``slot`` owes before a new request: the dropped answer of a
        cancelled call, a replacement's start-up answer. A worker that died between calls is
        replaced (its episodes are rebuilt: none was in a call). A replacement that cannot start
        fails the calling episode (``died``) and is replaced again for the next call."""
        worker = self._workers[slot]
        if worker.owed is None and not worker.process.is_alive():
            self._replace(slot)
            worker = self._workers[slot]
        if worker.owed == "reply":
            try:
                await self._receive(worker)
                worker.owed = None
            except _WorkerLost:
                self._replace(slot)
                worker = self._workers[slot]
        if worker.owed == "ready":
            try:
                status, value = await self._receive(worker)
            except _WorkerLost as lost:
                status, value = "error", str(lost)
            if status == "error":
                self._replace(slot)
                raise EpisodeFailure(episode_id, "died", f"its worker was replaced, and the replacement did not start: {value}")
            worker.owed = None

    async def _receive(self, worker: _Worker) -> tuple[str, Any]:
        """The worker's next message, waiting without blocking the loop until ``worker.deadline``.

        Raises:
            _WorkerLost: nothing came by the deadline (``timeout``), or the process exited (``died``).
        """
        if not worker.connection.poll():
            woken = await _readable((worker.connection.fileno(), worker.process.sentinel), worker.deadline - time.monotonic())
            if not woken:
                raise _WorkerLost("timeout", f"no answer within {worker.timeout_s:g} s")
            if not worker.connection.poll():  # the process exited, and something it started holds the pipe
                raise _WorkerLost("died", await _exit_code(worker.process))
        try:
            return worker.connection.recv()
        except (EOFError, OSError):
            raise _WorkerLost("died", await _exit_code(worker.process)) from None

    def _replace(self, slot: int) -> None:
        """Kill the worker at ``slot`` and start another; its started episodes will be replayed."""
        self._workers[slot].kill()
        # Reaped later (``exitcode`` polls without waiting) or at close: never wait on the loop.
        self._retired[:] = [process for process in self._retired if process.exitcode is None] + [self._workers[slot].process]
        self._workers[slot] = self._start_worker(slot)
        self.replaced += 1
        for episode in self._episodes.values():
            if episode.slot == slot and episode.started:
                episode.stale = True


async def _exit_code(process) -> str:
    """``exit code N`` of a process whose pipe closed, awaited briefly: its exit is noticed before
    it can be reaped."""
    deadline = time.monotonic() + EXIT_CODE_WAIT_S
    while process.exitcode is None and time.monotonic() < deadline:
        await asyncio.sleep(_EXIT_CODE_POLL_S)
    return f"exit code {process.exitcode}" if process.exitcode is not None else "exit code not known yet"


async def _readable(descriptors: tuple[int, ...], timeout_s: float) -> bool:
    """Wait until one of ``descriptors`` is readable (True) or ``timeout_s`` passes (False)."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    for descriptor in descriptors:
        loop.add_reader(descriptor, wake)
    try:
        await asyncio.wait_for(woken, max(0.0, timeout_s))
        return True
    except TimeoutError:
        return False
    finally:
        for descriptor in descriptors:
            loop.remove_reader(descriptor)
