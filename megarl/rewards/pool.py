"""Isolated reward scoring: a pool of worker processes with a per-sample timeout.

Reward code is untrusted in the ways that matter for a long run: it can raise, hang, be slow or
return nonsense. Each sample (with ``reward.batched``: each worker's share of the batch) is scored
in a worker process; an exception, a timeout or a value that is not a finite score scores 0 and is
counted; a worker that times out (or dies) is killed and replaced, so the pool is back at full size
for the next call. Workers ignore Ctrl-C: the run that owns them stops them. When more than ``max_failure_rate`` of a batch fails, :meth:`RewardPool.score` raises
:class:`RewardError` showing the first error, so a broken reward function stops the run early
instead of training on zeros.

A batch's bookkeeping (:class:`BatchTally`) and the checked call of the function
(:func:`call_reward`) serve the in-process scorer (:mod:`megarl.rewards.inline`) too, so that the
two score alike; the remote client shares :func:`as_score` and :func:`finish_batch`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import numbers
import queue
import signal
import time
import traceback
from typing import Any, Callable

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
    sample_extras: list[dict[str, float]]
    """Each sample's extra numbers, in input order (empty where it returned none or failed)."""
    failures: int
    """Samples that raised, timed out, or returned something that is not a finite score."""
    timeouts: int
    """Of the failures, those that hit the timeout."""
    first_error: str | None
    """What went wrong with the failed sample of the lowest index (``sample N: ...``)."""
    first_failed: int | None = None
    """That sample's index."""


def _worker(kind: str, target: str, batched: bool, tasks, results) -> None:
    from megarl.rewards.functions import resolve

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        score = resolve(kind, target, batched)
    except Exception:  # noqa: BLE001 - reported to the parent, which decides
        results.put((None, "error", load_failure(kind, target)))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        task_id, samples = task
        try:
            results.put((task_id, "ok", call_reward(score, samples)))
        except Exception:  # noqa: BLE001 - any error in user code scores 0
            results.put((task_id, "error", traceback.format_exc(limit=5)))


def call_reward(score: Callable[[list[dict]], Any], samples: list[dict[str, Any]]) -> list[Any]:
    """``score(samples)`` (:func:`megarl.rewards.functions.resolve`), checked to be one value per
    sample, each as a plain Python number where it was a numpy or torch scalar.

    Raises:
        TypeError: a batched function returned something other than a list of ``len(samples)``
            values; and whatever the function raises.
    """
    values = score(samples)
    sequence = hasattr(values, "__len__") and hasattr(values, "__iter__") and not isinstance(values, (str, bytes, dict))
    if not sequence or len(values) != len(samples):
        got = f"{len(values)} values" if sequence else f"a {type(values).__name__}"
        raise TypeError(f"a batched reward function must return a list of {len(samples)} scores; got {got}")
    # Plain Python numbers: a numpy array or tensor (as verl's batch manager accepts) too.
    return [value.item() if hasattr(value, "item") else value for value in values]


def load_failure(kind: str, target: str) -> str:
    """The message of a reward function that failed to load, with the traceback being handled."""
    return f"loading reward {kind}:{target} failed:\n{traceback.format_exc()}"


class _Worker:
    def __init__(self, context, kind: str, target: str, batched: bool, results):
        self.tasks = context.Queue()
        self.process = context.Process(target=_worker, args=(kind, target, batched, self.tasks, results), daemon=True)
        self.process.start()
        self.task_id: int | None = None
        self.indices: list[int] = []
        self.started = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)


class RewardPool:
    """``num_workers`` processes scoring samples with ``kind``/``target`` (see
    :func:`megarl.rewards.functions.resolve`); with ``batched`` each call scores a worker's share
    of the batch and ``timeout_s`` applies to the call."""

    def __init__(
        self, kind: str, target: str, num_workers: int = 2, timeout_s: float = 10.0, max_failure_rate: float = 0.5, *, batched: bool = False
    ):
        self.kind, self.target, self.batched = kind, target, batched
        self.timeout_s = timeout_s
        self.max_failure_rate = max_failure_rate
        self._context = multiprocessing.get_context("spawn")
        self._results = self._context.Queue()
        self._workers = [_Worker(self._context, kind, target, batched, self._results) for _ in range(num_workers)]
        self._ids = itertools.count()
        self.replaced = 0
        """Workers killed and replaced so far (hung or dead)."""

    @property
    def alive(self) -> int:
        return sum(worker.process.is_alive() for worker in self._workers)

    def _replace(self, position: int) -> None:
        self._workers[position].kill()
        self._workers[position] = _Worker(self._context, self.kind, self.target, self.batched, self._results)
        self.replaced += 1

    def score(self, samples: list[dict[str, Any]]) -> ScoredBatch:
        """Score ``samples`` (each the keyword arguments of megarl's reward signature) in input order."""
        tally = BatchTally(len(samples))
        share = -(-len(samples) // len(self._workers)) if self.batched else 1
        pending = [list(range(start, min(start + share, len(samples)))) for start in range(0, len(samples), share)]
        running: dict[int, int] = {}  # task id -> worker position
        while pending or running:
            for position, worker in enumerate(self._workers):
                if worker.task_id is None and pending:
                    worker.indices = pending.pop(0)
                    worker.task_id, worker.started = next(self._ids), time.monotonic()
                    running[worker.task_id] = position
                    worker.tasks.put((worker.task_id, [samples[index] for index in worker.indices]))
            try:
                task_id, status, value = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                task_id, status, value = -1, None, None
            if task_id is None:
                # A worker could not even load the reward function: nothing would score.
                raise RewardError(value)
            if task_id in running:
                worker = self._workers[running.pop(task_id)]
                indices, worker.task_id, worker.indices = worker.indices, None, []
                if status == "error":
                    for index in indices:
                        tally.fail(index, value)
                    continue
                for index, returned in zip(indices, value):
                    tally.add(index, returned)
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
                        tally.timeouts += len(worker.indices)
                        problem = f"timed out after {self.timeout_s:g} s"
                    else:
                        problem = f"worker died (exit code {worker.process.exitcode})"
                    for index in worker.indices:
                        tally.fail(index, problem)
                    self._replace(position)
        return tally.finish(self.max_failure_rate)

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


class BatchTally:
    """One batch's scores as they come in, in any order: the scores, the extra metrics and the
    failures, of which the one of the lowest sample index is reported."""

    def __init__(self, size: int):
        self.scores: list[float | None] = [None] * size
        """One entry per sample, None until it is scored or failed."""
        self.extras: list[dict[str, float]] = [{} for _ in range(size)]
        """Each sample's extra numbers, empty until it is scored (and where it failed)."""
        self.failures = 0
        self.timeouts = 0
        """Of the failures, those that hit the timeout (counted by the caller, which knows)."""
        self.first_error: str | None = None
        self.first_failed: int | None = None

    def fail(self, index: int, message: str) -> None:
        """Sample ``index`` failed (``message`` says how): it scores 0 and is counted."""
        self.scores[index] = 0.0
        self.extras[index] = {}
        self.failures += 1
        if self.first_failed is None or index < self.first_failed:
            self.first_error, self.first_failed = f"sample {index}: {message}", index

    def add(self, index: int, returned: Any) -> None:
        """What the function returned for sample ``index``: a score with extras (:func:`as_score`),
        or a failure."""
        try:
            score, extra = as_score(returned)
        except (TypeError, ValueError) as error:
            self.fail(index, str(error))
            return
        self.scores[index] = score
        self.extras[index] = extra

    def finish(self, max_failure_rate: float) -> ScoredBatch:
        """The batch (:func:`finish_batch`); raises :class:`RewardError` above ``max_failure_rate``."""
        return finish_batch(self.scores, self.extras, self.failures, self.timeouts, self.first_error, max_failure_rate, self.first_failed)


def finish_batch(scores, extras, failures, timeouts, first_error, max_failure_rate, first_failed=None) -> ScoredBatch:
    """Assemble a :class:`ScoredBatch` from the scores and each sample's extras (a dict per
    sample); raise :class:`RewardError` above ``max_failure_rate``."""
    if scores and failures / len(scores) > max_failure_rate:
        raise RewardError(
            f"{failures} of {len(scores)} samples failed to score (reward.max_failure_rate = "
            f"{max_failure_rate}); first error:\n{first_error}"
        )
    by_key: dict[str, list[float]] = {}
    for sample in extras:
        for key, number in sample.items():
            by_key.setdefault(key, []).append(number)
    return ScoredBatch(
        scores=[float(s) for s in scores],
        extras={key: sum(values) / len(values) for key, values in by_key.items()},
        sample_extras=list(extras),
        failures=failures,
        timeouts=timeouts,
        first_error=first_error,
        first_failed=first_failed,
    )


def as_score(value: Any) -> tuple[float, dict[str, float]]:
    """A function's return value -> (score, extra metrics); errors say what was expected.

    Raises:
        TypeError, ValueError: not a number or a dict with ``"score"``, or a score that is NaN or
            infinite (it would poison the advantages of its whole group).
    """
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward dict must have a 'score' key; got keys {sorted(value)}")
        # Numbers (bools too) become metrics; other values (verl's math_dapo returns the parsed
        # prediction as a string) are the function's own business and are dropped.
        extra = {key: float(number) for key, number in value.items() if key != "score" and isinstance(number, numbers.Real)}
        score = value["score"]
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        score, extra = value, {}
    else:
        raise TypeError(f"a reward function must return a float or a dict with 'score'; got {type(value).__name__}")
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise TypeError(f"a reward's 'score' must be a number; got {type(score).__name__}")
    if not math.isfinite(score):
        raise ValueError(f"the score is {score}: a reward must be a finite number")
    return float(score), extra
