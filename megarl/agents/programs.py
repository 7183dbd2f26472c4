"""Agent programs (``agent.openai_agent``): users' functions that play episodes over the OpenAI
chat-completions API, run isolated in worker processes.

A program is a function ``function(base_url, row) -> float | None`` in a user's file, named as
``path/to/agent.py:function``. It plays one episode against ``base_url`` (the episode's address on
the :class:`~megarl.agents.openai_server.ChatEndpoint`, which records the trajectory) and returns
the episode's reward, or None to leave scoring to the reward section.

:class:`ProgramPool` keeps what a program does wrong to the episode it happened in:

- ``num_workers`` processes (spawned, each its own session so that a kill takes whatever the
  program started; Ctrl-C ignored) import the function once; each runs many episodes at once,
  one thread per episode (programs spend their time waiting on HTTP).
- An episode whose program raises, or returns something that is not a finite number or None,
  fails with kind ``error``; one still running ``episode_timeout_s`` after the round started fails
  with ``timeout``, the clock of a worker still starting (a replacement) running from when it is
  ready, not before: its start-up is not the program's time (the caller is told at once, to close the episode on the endpoint so that the
  program's next call is refused), and its worker is replaced once the round is over (a thread
  cannot be stopped otherwise); one whose worker dies fails with ``died`` and the worker is
  replaced.
- A file that does not import, a missing function, or one that cannot be called as
  ``function(base_url, row)`` is refused when the pool starts, as one :class:`EnvironmentLoadError`.
- Workers die with the pool: :meth:`ProgramPool.close` (also on garbage collection and at exit)
  kills their process groups, and a worker whose pool's process is gone kills its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import multiprocessing
import multiprocessing.connection
import numbers
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megarl.agents.environment import EnvironmentLoadError
from megarl.agents.processes import EXIT_CODE_WAIT_S, START_TIMEOUT_S, become_worker, kill_group, shut_down
from megarl.rewards.functions import import_user_file, named_function

@dataclasses.dataclass(frozen=True, slots=True)
class ProgramEpisode:
    """One episode for a program to play."""

    episode_id: str
    base_url: str
    """The episode's address on the chat endpoint: the program's OpenAI ``base_url``."""
    row: dict[str, Any]
    """The dataset row's fields (:func:`megarl.agents.play.environment_row`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramOutcome:
    """How a program's episode ended."""

    reward: float | None = None
    """What the program returned; None: the reward section scores the last model turn."""
    failure: str | None = None
    """``error``, ``timeout`` or ``died``; None: the program returned."""
    message: str = ""
    """What went wrong, for the log."""


def load_agent_program(spec: str) -> Callable[[str, dict], Any]:
    """``agent.openai_agent`` (``path/to/agent.py:function``) -> the function, imported.

    Raises:
        EnvironmentLoadError: naming the setting, the file (and the line of a syntax error), the
            function and what to do.
    """
    where = f"agent.openai_agent = {spec!r}"
    path_text, separator, name = spec.rpartition(":")
    if not separator or not path_text or not name:
        raise EnvironmentLoadError(f"{where} is not path/to/agent.py:function (the file, a colon, the function's name)")
    path = Path(path_text)
    module = import_user_file(path, f"megarl_user_agent_{path.stem}", where, EnvironmentLoadError)
    function = named_function(module, name, path, where, EnvironmentLoadError)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return function  # no signature to read (a builtin): its first call will tell
    try:
        signature.bind("http://127.0.0.1/v1", {})
    except TypeError as error:
        raise EnvironmentLoadError(
            f"{where}: {name}{signature} cannot be called as {name}(base_url, row) ({error}): an agent program is "
            f"def {name}(base_url: str, row: dict) -> float | None"
        ) from None
    return function


def checked_reward(value: Any) -> float | None:
    """A program's return value as the episode's reward: a finite number (bools refused), or None.

    Raises:
        ValueError: naming what was returned and what a program returns.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
        raise ValueError(f"returned {value}: a reward must be a finite number")
    raise ValueError(f"returned a {type(value).__name__} ({value!r:.80}): an agent program returns the episode's reward as a float, or None")


def _serve(spec: str, tasks, results, lifeline) -> None:
    """A worker's main: import the program, answer ``("ready", None, None)`` (or ``("error",
    None, message)``), then play each task ``(task_id, base_url, row)`` on a thread of its own,
    answering ``("ok", task_id, reward)`` or ``("error", task_id, message)``."""
    become_worker(lifeline)
    try:
        function = load_agent_program(spec)
    except EnvironmentLoadError as error:
        results.send(("error", None, str(error)))
        return
    except Exception:  # noqa: BLE001 - reported to the pool, which raises it
        results.send(("error", None, f"agent.openai_agent = {spec!r}: loading the program failed:\n{traceback.format_exc(limit=-8)}"))
        return
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            results.send(message)

    send(("ready", None, None))
    while True:
        try:
            task_id, base_url, row = tasks.recv()
        except EOFError:
            return
        threading.Thread(target=_play, args=(function, task_id, base_url, row, send), name=f"agent-episode-{task_id}", daemon=True).start()


def _play(function: Callable, task_id: int, base_url: str, row: dict, send: Callable[[tuple], None]) -> None:
    """One episode on a worker's thread: the program's reward, checked, or what went wrong."""
    name = getattr(function, "__name__", "the agent program")
    try:
        value = function(base_url, row)
    except Exception as error:  # noqa: BLE001 - any error of the program fails its episode
        frames = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next, limit=-8))
        send(("error", task_id, f"{name} raised {type(error).__name__}: {error}\n{frames}"))
        return
    try:
        send(("ok", task_id, checked_reward(value)))
    except ValueError as error:
        send(("error", task_id, f"{name} {error}"))


class _Worker:
    """One worker process, the pool's ends of its two pipes (tasks out, results in) and the
    episodes it is playing."""

    def __init__(self, context, spec: str, lifeline, slot: int):
        worker_tasks, self.tasks = context.Pipe(duplex=False)
        self.results, worker_results = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(spec, worker_tasks, worker_results, lifeline), name=f"megarl-agent-program-{slot}", daemon=True)
        self.process.start()
        worker_tasks.close()  # so that a send to a dead worker fails, and a read of its results ends
        worker_results.close()
        self.running: dict[int, int] = {}
        """Task id -> the episode's position in the round."""
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        """When it answered that it imported the program; None: not yet."""

    def deadline(self, round_start: float, timeout_s: float) -> float:
        """When its episodes of a round that started at ``round_start`` time out: ``timeout_s``
        after the round started or after it became ready, whichever is later; a worker still
        starting is given :data:`START_TIMEOUT_S` to become ready on top."""
        if self.ready_at is None:
            return self.started_at + START_TIMEOUT_S + timeout_s
        return max(round_start, self.ready_at) + timeout_s

    def kill(self) -> None:
        """SIGKILL its process group (itself and what its programs started), else the process
        alone if it has not made its own group yet; never waits."""
        kill_group(self.process)
        self.tasks.close()
        self.results.close()


class ProgramPool:
    """The agent program ``spec`` (:func:`load_agent_program`) in ``num_workers`` worker processes.

    The constructor blocks until every worker has imported the program (at most
    :data:`START_TIMEOUT_S`).

    Raises:
        EnvironmentLoadError: the program cannot be loaded (the first worker's message).
        ValueError: ``num_workers`` below 1 or ``episode_timeout_s`` not positive.
    """

    def __init__(self, spec: str, *, num_workers: int = 2, episode_timeout_s: float = 600.0):
        if num_workers < 1:
            raise ValueError(f"ProgramPool: num_workers is {num_workers}; it must be at least 1")
        if not episode_timeout_s > 0:
            raise ValueError(f"ProgramPool: episode_timeout_s is {episode_timeout_s}; it must be positive (seconds)")
        self.spec, self.episode_timeout_s = spec, episode_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._lifeline_worker_end, lifeline = self._context.Pipe(duplex=False)
        self._workers: list[_Worker] = []
        self._retired: list = []
        """Killed worker processes not yet reaped."""
        self._finalizer = weakref.finalize(self, shut_down, self._workers, self._retired, (lifeline, self._lifeline_worker_end))
        self._task_ids = itertools.count()
        self._playing = threading.Lock()
        """One :meth:`play` at a time (the workers' pipes and task tables are shared): an async
        run's rounds and a validation pass take turns."""
        self.replaced = 0
        """Workers killed and replaced so far (died, or ran a program that timed out)."""
        try:
            self._workers.extend(self._start_worker(slot) for slot in range(num_workers))
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    def _start_worker(self, slot: int) -> _Worker:
        return _Worker(self._context, self.spec, self._lifeline_worker_end, slot)

    def _wait_until_ready(self) -> None:
        """Every worker's start-up answer; raises the first failure (once, for all workers)."""
        where = f"agent.openai_agent = {self.spec!r}"
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self._workers:
            if not worker.results.poll(max(0.0, deadline - time.monotonic())):
                raise EnvironmentLoadError(f"{where}: an agent program worker did not import it within {START_TIMEOUT_S:g} s")
            try:
                status, _, message = worker.results.recv()
            except EOFError:
                worker.process.join(timeout=EXIT_CODE_WAIT_S)
                raise EnvironmentLoadError(f"{where}: an agent program worker exited while importing it (exit code {worker.process.exitcode})") from None
            if status == "error":
                raise EnvironmentLoadError(message)
            worker.ready_at = time.monotonic()

    @property
    def alive(self) -> int:
        """Worker processes alive now."""
        return sum(worker.process.is_alive() for worker in self._workers)

    def play(self, episodes: Sequence[ProgramEpisode], *, on_timeout: Callable[[str], Any] = lambda episode_id: None) -> list[ProgramOutcome]:
        """Play every episode at once (spread evenly over the workers) and wait until each has
        ended or ``episode_timeout_s`` has passed. Calls from several threads take turns.

        Args:
            on_timeout: called with the id of each episode that times out, as it does.

        Returns:
            One outcome per episode, in order.

        Raises:
            EnvironmentLoadError: a replaced worker could not import the program again.
        """
        with self._playing:
            return self._play(episodes, on_timeout)

    def _play(self, episodes: Sequence[ProgramEpisode], on_timeout: Callable[[str], Any]) -> list[ProgramOutcome]:
        if not self._finalizer.alive:
            raise RuntimeError(f"the agent program pool of {self.spec!r} is closed")
        outcomes: list[ProgramOutcome | None] = [None] * len(episodes)
        for position, episode in enumerate(episodes):
            worker = self._workers[position % len(self._workers)]
            task_id = next(self._task_ids)
            try:
                worker.tasks.send((task_id, episode.base_url, episode.row))
                worker.running[task_id] = position
            except (OSError, ValueError) as error:
                outcomes[position] = ProgramOutcome(failure="died", message=f"its worker process is gone ({error}); the worker is replaced")
        round_start = time.monotonic()
        overran: list[int] = []
        while any(worker.running for worker in self._workers):
            now = time.monotonic()
            deadlines = {slot: worker.deadline(round_start, self.episode_timeout_s) for slot, worker in enumerate(self._workers) if worker.running}
            for slot, deadline in deadlines.items():
                if deadline <= now:
                    worker = self._workers[slot]
                    overran.append(slot)
                    if worker.ready_at is None:
                        message = f"its worker (a replacement) did not import the program within {START_TIMEOUT_S:g} s"
                    else:
                        message = f"the program did not return within agent.episode_timeout_s ({self.episode_timeout_s:g} s)"
                    for position in worker.running.values():
                        outcomes[position] = ProgramOutcome(failure="timeout", message=message)
                        on_timeout(episodes[position].episode_id)
                    worker.running.clear()
            if not any(worker.running for worker in self._workers):
                break
            # A worker whose programs overran is left alone until it is replaced after the round.
            listening = [slot for slot in range(len(self._workers)) if slot not in overran]
            watched = [self._workers[slot].results for slot in listening] + [self._workers[slot].process.sentinel for slot in listening]
            remaining = min(deadline for slot, deadline in deadlines.items() if self._workers[slot].running) - now
            multiprocessing.connection.wait(watched, timeout=max(remaining, 0.0))
            for slot in listening:
                self._collect(slot, outcomes)
        for slot in overran:
            self._replace(slot)
        return [outcome if outcome is not None else ProgramOutcome(failure="died", message="its worker died") for outcome in outcomes]

    def _collect(self, slot: int, outcomes: list[ProgramOutcome | None]) -> None:
        """Read what the worker at ``slot`` has answered; a worker that died fails its episodes
        (``died``) and is replaced."""
        worker = self._workers[slot]
        lost = False
        try:
            while worker.results.poll():
                status, task_id, value = worker.results.recv()
                if task_id is None:
                    if status == "error":  # a replacement could not import the program again
                        raise EnvironmentLoadError(value)
                    worker.ready_at = time.monotonic()
                    continue
                position = worker.running.pop(task_id, None)
                if position is not None:
                    outcomes[position] = ProgramOutcome(reward=value) if status == "ok" else ProgramOutcome(failure="error", message=value)
        except (EOFError, OSError):
            lost = True  # its end of the pipe is closed: the process is gone, or going
        if not lost and worker.process.is_alive():
            return
        worker.process.join(timeout=EXIT_CODE_WAIT_S)
        for position in worker.running.values():
            outcomes[position] = ProgramOutcome(failure="died", message=f"its worker process died (exit code {worker.process.exitcode}); the worker was replaced")
        self._replace(slot)

    def _replace(self, slot: int) -> None:
        """Kill the worker at ``slot`` and start another (not waited for: its tasks queue up)."""
        self._workers[slot].kill()
        self._retired[:] = [process for process in self._retired if process.exitcode is None] + [self._workers[slot].process]
        self._workers[slot] = self._start_worker(slot)
        self.replaced += 1

    def close(self) -> None:
        """Kill every worker (and whatever its programs started) and reap them; idempotent."""
        self._finalizer()

    def __enter__(self) -> ProgramPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
