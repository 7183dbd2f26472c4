"""The rollout buffer of ``rollout.mode: async``: generation runs ahead of training, as far as the
staleness bound lets it.

Versions count weight updates: the engines launch with version 0 and the trainer pushes version
``s + 1`` after step ``s``, so it trains step ``s`` at version ``s``. A group (the samples of one
prompt) whose oldest token came from version ``o`` may be trained at trainer version ``v`` only
while ``v - o <= K`` (``rollout.max_staleness``).

**Admission** (AReaL's capacity rule). Samples are admitted for training in order: the ``j``-th
(from 0) belongs to train batch ``j // B`` (``B`` samples per step), trained at version ``j // B``.
Its generation may start only while the engines' version ``v`` satisfies ``j < (v + K + 1) B``,
so its first token comes from a version ``>= j // B - K``: it will be at most ``K`` stale. A
sample that ends up in no batch (a filter dropped its group, or it came too late) gives its place
back, so the ones after it move up. Samples are admitted in whole groups, a round at a time or
as many groups of it as fit under the bound; when none fit but the batch the trainer waits for
(``j < (v + 1) B``) is not covered (places given back), just the groups that cover it start, so
the trainer never waits on the bound and nothing is admitted that the bound will drop. Nothing
starts past the samples the run will train (``total_samples``).

**The bound itself** is enforced where the trainer takes groups (:meth:`RolloutBuffer.take`): a
group past it is dropped, counted, and handed back to the producer so that its prompt is generated
again (:meth:`RolloutBuffer.drain_dropped`). Admission keeps that from happening when groups are
taken in the order they were admitted; a group the dynamic-sampling reserve tops a batch up with
takes back a place that may have been given to another meanwhile, which can push one over.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any


@dataclasses.dataclass(slots=True)
class BufferedGroup:
    """The scored samples of one prompt, waiting to be trained."""

    samples: list[Any]
    """The trainer's sample records, in sample order."""
    oldest_version: int
    """The weight version of the oldest token among them."""
    prompt_position: int
    """The prompt's position in the training set (generated again if the group is dropped)."""


def _whole_groups(count: int, group: int) -> int:
    """The fewest samples in whole groups of ``group`` that hold ``count``."""
    return -(-count // group) * group


class BufferClosed(RuntimeError):
    """The buffer was closed while a caller waited on it."""


class RolloutBuffer:
    """Admission control for the producer and staleness-checked groups for the trainer; safe to
    share between threads.

    Args:
        batch_samples: ``B``, samples per train batch.
        max_staleness: ``K``.
        version: the trainer's version now (the step a resumed run starts at).
        total_samples: samples the whole run trains (``steps x B``); None: no end.
    """

    def __init__(self, batch_samples: int, max_staleness: int, version: int = 0, total_samples: int | None = None):
        self.batch_samples = batch_samples
        self.max_staleness = max_staleness
        self.total_samples = total_samples
        self.version = version
        self.admitted = version * batch_samples
        """Samples admitted for training from the start of the run (``j`` of the next one)."""
        self.held = False
        """Admission stopped (a weight update waits for the samples in flight)."""
        self.ready: collections.deque[BufferedGroup] = collections.deque()
        self.dropped: list[BufferedGroup] = []
        """Groups dropped for staleness since the last :meth:`drain_dropped`."""
        self.error: BaseException | None = None
        self.closed = False
        self._state = threading.Condition()

    @property
    def capacity(self) -> int:
        """Samples that may be admitted at the current version: ``(v + K + 1) B``."""
        return (self.version + self.max_staleness + 1) * self.batch_samples

    @property
    def ready_samples(self) -> int:
        """Samples waiting in the buffer."""
        with self._state:
            return sum(len(group.samples) for group in self.ready)

    def _grant(self, samples: int, group: int) -> int:
        """Samples (whole groups, at most ``samples``) that may start now (the module docstring)."""
        if self.held:
            return 0
        room = (self.capacity - self.admitted) // group * group
        grant = min(samples, room)
        if grant <= 0:
            needed = (self.version + 1) * self.batch_samples - self.admitted
            grant = min(samples, _whole_groups(needed, group)) if needed > 0 else 0
        if self.total_samples is not None:
            grant = min(grant, _whole_groups(max(self.total_samples - self.admitted, 0), group))
        return grant

    def admit(self, samples: int, group: int = 1, timeout_s: float | None = None) -> int:
        """Wait until some of ``samples`` (whole groups of ``group``) may start (the capacity rule,
        see the module docstring; admission not held), then count them as admitted.

        Returns:
            the samples admitted, a multiple of ``group``; 0 when ``timeout_s`` passed first.

        Raises:
            BufferClosed: the buffer was closed.
        """
        with self._state:
            self._state.wait_for(lambda: self.closed or self._grant(samples, group) > 0, timeout=timeout_s)
            if self.closed:
                raise BufferClosed("the rollout buffer is closed")
            grant = self._grant(samples, group)
            self.admitted += grant
            return grant

    def put(self, groups: list[BufferedGroup], released: int = 0) -> None:
        """Add scored groups, and give back ``released`` admitted samples that will not be trained."""
        with self._state:
            self.ready.extend(groups)
            self.admitted -= released
            self._state.notify_all()

    def release(self, samples: int) -> None:
        """Give back admitted samples that will not be trained (a filter dropped their group)."""
        self.put([], released=samples)

    def fail(self, error: BaseException) -> None:
        """The producer failed: the trainer's next :meth:`take` raises ``error``."""
        with self._state:
            self.error = error
            self._state.notify_all()

    def take(self, timeout_s: float | None = None) -> BufferedGroup | None:
        """The oldest group still within the bound at the current version, waiting for one;
        groups past the bound are dropped on the way (:meth:`drain_dropped`).

        Returns:
            the group, or None when ``timeout_s`` passed first.

        Raises:
            BufferClosed: the buffer was closed.
            BaseException: the error the producer failed with (:meth:`fail`).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._state:
            while True:
                while self.ready:
                    group = self.ready.popleft()
                    if self.version - group.oldest_version <= self.max_staleness:
                        return group
                    self.dropped.append(group)
                    self.admitted -= len(group.samples)
                    self._state.notify_all()
                if self.error is not None:
                    raise self.error
                if self.closed:
                    raise BufferClosed("the rollout buffer is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._state.wait(remaining)

    def groups(self) -> list[BufferedGroup]:
        """The groups waiting to be trained and those dropped but not drained yet, oldest first."""
        with self._state:
            return list(self.ready) + list(self.dropped)

    def drain_dropped(self) -> list[BufferedGroup]:
        """The groups dropped for staleness since the last call."""
        with self._state:
            dropped, self.dropped = self.dropped, []
            return dropped

    def set_version(self, version: int) -> None:
        """The trainer pushed ``version``: admission may run further ahead."""
        with self._state:
            self.version = version
            self._state.notify_all()

    def hold(self, held: bool) -> None:
        """Stop (True) or restart (False) admission."""
        with self._state:
            self.held = held
            self._state.notify_all()

    def close(self) -> None:
        """Wake every waiter with :class:`BufferClosed`."""
        with self._state:
            self.closed = True
            self._state.notify_all()
