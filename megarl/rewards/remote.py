"""Remote rewards: samples POSTed in batches to a scoring service.

Request (JSON): ``{"samples": [{"prompt": ..., "response": ..., "answer": ..., <row fields>}, ...]}``.
Response (JSON): ``{"scores": [s_0, s_1, ...]}``, one entry per sample in order, each a number or
a dict with ``"score"`` and extra numbers (as a reward function returns).

Each request has a timeout; a connection error, a timeout or a 5xx answer is retried with
exponential backoff; a batch that still fails scores 0 for its samples, counted as failures, and
the failure-rate limit applies as in the worker pool.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from megarl.rewards.pool import ScoredBatch, as_score, finish_batch

_BACKOFF_S = 0.2
"""First retry delay; doubled on each further retry."""


class RemoteReward:
    """Scores samples through ``url`` in batches of ``batch_size``."""

    def __init__(self, url: str, batch_size: int = 32, retries: int = 3, timeout_s: float = 10.0, max_failure_rate: float = 0.5):
        self.url = url
        self.batch_size = batch_size
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_failure_rate = max_failure_rate

    def _post(self, samples: list[dict[str, Any]]) -> list[Any]:
        body = json.dumps({"samples": samples}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
            scores = json.loads(answer.read())["scores"]
        if len(scores) != len(samples):
            raise ValueError(f"{self.url} returned {len(scores)} scores for {len(samples)} samples")
        return scores

    def _post_with_retries(self, samples: list[dict[str, Any]]) -> list[Any]:
        delay = _BACKOFF_S
        for attempt in range(self.retries + 1):
            try:
                return self._post(samples)
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == self.retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == self.retries:
                    raise
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")

    def score(self, samples: list[dict[str, Any]]) -> ScoredBatch:
        scores: list[float] = []
        extras: list[dict[str, float]] = []
        failures, timeouts, first_error, first_failed = 0, 0, None, None
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            try:
                values = self._post_with_retries(chunk)
            except Exception as error:  # noqa: BLE001 - any failure of the service scores 0
                failures += len(chunk)
                timed_out = isinstance(error, TimeoutError) or "timed out" in str(error)
                timeouts += len(chunk) if timed_out else 0
                if first_error is None:
                    first_error, first_failed = f"samples {start}-{start + len(chunk) - 1}: {self.url}: {error}", start
                scores += [0.0] * len(chunk)
                extras += [{} for _ in chunk]
                continue
            for offset, value in enumerate(values):
                try:
                    score, extra = as_score(value)
                except (TypeError, ValueError) as error:
                    failures += 1
                    if first_error is None:
                        first_error, first_failed = f"sample {start + offset}: {error}", start + offset
                    score, extra = 0.0, {}
                scores.append(score)
                extras.append(extra)
        return finish_batch(scores, extras, failures, timeouts, first_error, self.max_failure_rate, first_failed)
