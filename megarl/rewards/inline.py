"""Trusted reward scoring in the training process (``reward.isolation: none``).

The worker pool (:mod:`megarl.rewards.pool`) costs a queue round trip per sample (per worker share
with ``reward.batched``): for a cheap rule such as the toy task's regex that is far more than the
scoring itself. :class:`InlineScorer` calls the same function in the calling thread and gives the
same results: an exception or a value that is not a finite score scores 0 and is counted, the
failure of the lowest sample index is reported as ``sample N: ...``, a batched function scores the
whole batch in one call, and more than ``max_failure_rate`` failures raise :class:`RewardError`.

What it cannot do is protect the run: no timeout can be enforced (``timeouts`` is always 0), a
function that hangs hangs the run and one that crashes the interpreter kills it. It is for code
that cannot do either, which is why ``reward.isolation: auto`` picks it for the toy rule only.
"""

from __future__ import annotations

import traceback
from typing import Any

from megarl.rewards.functions import resolve
from megarl.rewards.pool import BatchTally, RewardError, ScoredBatch, call_reward, load_failure


class InlineScorer:
    """Scores samples with ``kind``/``target`` (see :func:`megarl.rewards.functions.resolve`) in
    the calling thread; with ``batched`` the whole batch is one call.

    A function that fails to load raises :class:`RewardError` on the first :meth:`score`, as the
    pool's does: a run builds its scorer on the first rank only, and an error raised while scoring
    stops every rank, where one raised while building would leave the others waiting.
    """

    def __init__(self, kind: str, target: str, max_failure_rate: float = 0.5, *, batched: bool = False):
        self.batched = batched
        self.max_failure_rate = max_failure_rate
        self._load_error: str | None = None
        try:
            self._score = resolve(kind, target, batched)
        except Exception:  # noqa: BLE001 - raised as RewardError when scoring, as the pool does
            self._load_error = load_failure(kind, target)

    def score(self, samples: list[dict[str, Any]]) -> ScoredBatch:
        """Score ``samples`` (each the keyword arguments of megarl's reward signature) in input order."""
        if self._load_error is not None:
            raise RewardError(self._load_error)
        tally = BatchTally(len(samples))
        calls = [list(range(len(samples)))] if self.batched and samples else [[index] for index in range(len(samples))]
        for indices in calls:
            try:
                values = call_reward(self._score, [samples[index] for index in indices])
            except Exception:  # noqa: BLE001 - any error in user code scores 0
                message = traceback.format_exc(limit=5)
                for index in indices:
                    tally.fail(index, message)
                continue
            for index, returned in zip(indices, values):
                tally.add(index, returned)
        return tally.finish(self.max_failure_rate)

    def close(self) -> None:
        """Nothing to stop: the scorer holds no process, thread or file."""

    def __enter__(self) -> InlineScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
