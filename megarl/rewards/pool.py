"""Isolated reward scoring: a pool of worker processes with a per-sample timeout.

Reward code is untrusted in the ways that matter for a long run: it can raise, hang, or be slow.
Each sample is scored in a worker process; an exception or a timeout scores 0 and is counted; a
worker that times out (or dies) is killed and replaced, so the pool is back at full size for the
next sample. When more than ``max_failure_rate`` of a batch fails, :meth:`RewardPool.score` raises
:class:`RewardError` showing the first error, so a broken reward function stops the run early
instead of training on zeros.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import queue
import time
import traceback
from typing import Any

_POLL_S = 0.05
"""How often the pool checks for finished, hung or dead workers."""


class RewardError(RuntimeError):
    """Too many samples of a batch failed to score."""


@dataclasses.dataclass(slots=True)
class ScoredBatch:
    """Scores of one batch, in input order, with what went wrong."""

    scores: list[float]
    """One score per sample; 0.0 where scoring failed."""
    extras: dict[str, float]
    """Mean of each extra number the function returned (over the samples that returned it)."""
    failures: int
    """Samples that raised, timed out, or returned something that is not a score."""
    timeouts: int
    """Of the failures, those that hit the timeout."""
    first_error: str | None


def _worker(kind: str, target: str, tasks, results) -> None:
    from megarl.rewards.functions import resolve

    try:
        function = resolve(kind, target)
    except Exception:  # noqa: BLE001 - reported to the parent, which decides
        results.put((None, "error", f"loading reward {kind}:{target} failed:\n{traceback.format_exc()}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        task_id, sample = task
        try:
            value = function(**sample)
            results.put((task_id, "ok", value))
        except Exception:  # noqa: BLE001 - any error in user code scores 0
            results.put((task_id, "error", traceback.format_exc(limit=5)))


class _Worker:
    def __init__(self, context, kind: str, target: str, results):
        self.tasks = context.Queue()
        self.process = context.Process(target=_worker, args=(kind, target, self.tasks, results), daemon=True)
        self.process.start()
        self.task_id: int | None = None
        self.index: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)


class RewardPool:
    """``num_workers`` processes scoring samples with ``kind``/``target`` (see
    :func:`megarl.rewards.functions.resolve`)."""

    def __init__(self, kind: str, target: str, num_workers: int = 2, timeout_s: float = 10.0, max_failure_rate: float = 0.5):
        self.kind, self.target = kind, target
        self.timeout_s = timeout_s
        self.max_failure_rate = max_failure_rate
        self._context = multiprocessing.get_context("spawn")
        self._results = self._context.Queue()
        self._workers = [_Worker(self._context, kind, target, self._results) for _ in range(num_workers)]
        self._ids = itertools.count()
        self.replaced = 0
        """Workers killed and replaced so far (hung or dead)."""

    @property
    def alive(self) -> int:
        return sum(worker.process.is_alive() for worker in self._workers)

    def _replace(self, position: int) -> None:
        self._workers[position].kill()
        self._workers[position] = _Worker(self._context, self.kind, self.target, self._results)
        self.replaced += 1

    def score(self, samples: list[dict[str, Any]]) -> ScoredBatch:
        """Score ``samples`` (each the keyword arguments of the reward function) in input order."""
        scores: list[float | None] = [None] * len(samples)
        extras: dict[str, list[float]] = {}
        failures, timeouts, first_error = 0, 0, None
        pending = list(range(len(samples)))
        running: dict[int, int] = {}  # task id -> worker position

        def fail(index: int, message: str) -> None:
            nonlocal failures, first_error
            scores[index] = 0.0
            failures += 1
            first_error = first_error or f"sample {index}: {message}"

        while pending or running:
            for position, worker in enumerate(self._workers):
                if worker.task_id is None and pending:
                    index = pending.pop(0)
                    worker.task_id, worker.index, worker.started = next(self._ids), index, time.monotonic()
                    running[worker.task_id] = position
                    worker.tasks.put((worker.task_id, samples[index]))
            try:
                task_id, status, value = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                task_id, status, value = -1, None, None
            if task_id is None:
                # A worker could not even load the reward function: nothing would score.
                raise RewardError(value)
            if task_id in running:
                worker = self._workers[running.pop(task_id)]
                index = worker.index
                worker.task_id = worker.index = None
                if status == "error":
                    fail(index, value)
                else:
                    try:
                        score, extra = as_score(value)
                    except (TypeError, ValueError) as error:
                        fail(index, str(error))
                    else:
                        scores[index] = score
                        for key, number in extra.items():
                            extras.setdefault(key, []).append(number)
            now = time.monotonic()
            for position, worker in enumerate(self._workers):
                if worker.task_id is None:
                    if not worker.process.is_alive():
                        self._replace(position)
                    continue
                hung = now - worker.started > self.timeout_s
                if hung or not worker.process.is_alive():
                    running.pop(worker.task_id, None)
                    if hung:
                        timeouts += 1
                        fail(worker.index, f"timed out after {self.timeout_s:g} s")
                    else:
                        fail(worker.index, f"worker died (exit code {worker.process.exitcode})")
                    self._replace(position)
        return finish_batch(scores, extras, failures, timeouts, first_error, self.max_failure_rate)

    def close(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.tasks.put(None)
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finish_batch(scores, extras, failures, timeouts, first_error, max_failure_rate) -> ScoredBatch:
    """Assemble a :class:`ScoredBatch`; raise :class:`RewardError` above ``max_failure_rate``."""
    if scores and failures / len(scores) > max_failure_rate:
        raise RewardError(
            f"{failures} of {len(scores)} samples failed to score (reward.max_failure_rate = "
            f"{max_failure_rate}); first error:\n{first_error}"
        )
    return ScoredBatch(
        scores=[float(s) for s in scores],
        extras={key: sum(values) / len(values) for key, values in extras.items()},
        failures=failures,
        timeouts=timeouts,
        first_error=first_error,
    )


def as_score(value: Any) -> tuple[float, dict[str, float]]:
    """A function's return value -> (score, extra metrics); errors say what was expected."""
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward dict must have a 'score' key; got keys {sorted(value)}")
        extra = {key: float(number) for key, number in value.items() if key != "score"}
        return float(value["score"]), extra
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), {}
    raise TypeError(f"a reward function must return a float or a dict with 'score'; got {type(value).__name__}")
