"""One weight update across every engine: the snapshot, the transport's session, and who missed it.

:meth:`WeightUpdater.send` writes each bucket to the snapshot (:mod:`megarl.rollout.snapshot`) and
pushes it to every engine over the chosen transport (:mod:`megarl.rollout.transports`) before it
reads the next, so the weight stream may reuse its buffer:

- ``tensor`` and ``nccl``: ``/begin_weight_update``, one call per bucket (with ``nccl``, one
  broadcast per bucket in a group made once and remade when its members change),
  ``/end_weight_update``, then ``/flush_cache``;
- ``disk``: ``/update_weights_from_disk`` on the snapshot's directory once it is complete.

An engine that fails part way (dead, stalled, cut off by a failed broadcast) is not sent the rest:
:meth:`~WeightUpdater.send` returns it, and the client gives it the complete snapshot afterwards
(:meth:`~WeightUpdater.catch_up`), restarting it through the supervisor if that fails too. An
engine that refuses the weights (:class:`EngineRequestError`: unknown names, wrong shapes) fails
the update.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

from megarl.rollout import protocol
from megarl.rollout.engine import Engine
from megarl.rollout.errors import EngineError, EngineRequestError
from megarl.rollout.snapshot import WeightSnapshot
from megarl.rollout.transports import BroadcastGroup, cuda_ipc_payloads, hf_file_payloads
from megarl.weights.bucket import Bucket

log = logging.getLogger(__name__)


class WeightUpdater:
    """Sends weight buckets to a group's engines; see the module docstring.

    Args:
        engines: the engines (all of one kind).
        snapshot: where every update is also written (and what lagging or restarted engines load).
        pool: threads for the concurrent engine calls.
        request_timeout_s: limit of one engine call (one bucket's update, one broadcast).
    """

    def __init__(self, engines: list[Engine], snapshot: WeightSnapshot, pool: concurrent.futures.Executor, request_timeout_s: float):
        self.engines = engines
        self.snapshot = snapshot
        self.request_timeout_s = request_timeout_s
        self._pool = pool
        self._broadcast = BroadcastGroup("nccl" if engines[0].kind == "sglang" else "gloo", request_timeout_s, pool)

    def send(self, buckets: Iterable[Bucket], weight_version: str, transport: str) -> dict[Engine, EngineError | None]:
        """Write ``buckets`` to the snapshot and load them into every engine over ``transport``.

        Args:
            buckets: the *whole* model, HF names.
            weight_version: what the engines report from now on.
            transport: ``tensor``, ``nccl`` or ``disk``.

        Returns:
            The engines that missed part of the update, with the error (None for one restarted
            meanwhile): each needs :meth:`catch_up`.

        Raises:
            EngineRequestError: an engine refused the weights (unknown names, wrong shapes).
        """
        failed: dict[Engine, EngineError] = {}
        incarnations = {engine: engine.incarnation for engine in self.engines}
        self.snapshot.begin(weight_version)
        try:
            if transport != "disk":
                self._each(self.engines, failed, lambda engine: self._call_once(engine, protocol.BEGIN_WEIGHT_UPDATE, {}))
            if transport == "nccl":
                self._connect_broadcast(failed)
            for bucket in buckets:
                if bucket.nbytes:
                    self._push(bucket, self.snapshot.add(bucket), weight_version, transport, failed)
            directory = str(self.snapshot.commit())
        except BaseException:
            self.snapshot.abort()
            if transport != "disk":
                with contextlib.suppress(EngineError):
                    self._end_sessions([engine for engine in self.engines if engine not in failed])
            raise
        if transport == "disk":
            body = protocol.update_from_disk_body(directory, weight_version)
            self._each(self.engines, failed, lambda engine: self._call_once(engine, protocol.UPDATE_FROM_DISK, body))
        else:
            self._each(self.engines, failed, lambda engine: self._call_once(engine, protocol.END_WEIGHT_UPDATE, {}))
            self._each(self.engines, failed, lambda engine: self._call_once(engine, protocol.FLUSH_CACHE, None))
        return {
            engine: failed.get(engine) for engine in self.engines if engine in failed or engine.incarnation != incarnations[engine]
        }

    def catch_up(self, engine: Engine, cause: EngineError | None) -> None:
        """Give an engine that missed part of an update the snapshot, closing any session it was left in.

        Raises:
            EngineError: the engine failed again (the caller restarts it).
        """
        if cause is not None:
            log.warning("rollout engine %s missed part of a weight update (%s); loading the snapshot", engine.label, cause)
        self._end_sessions([engine])
        self.load_snapshot(engine)

    def load_snapshot(self, engine: Engine) -> None:
        """Give ``engine`` the current weights (nothing to do before the first update)."""
        if self.snapshot.current is not None:
            body = protocol.update_from_disk_body(str(self.snapshot.current), self.snapshot.version)
            engine.call("POST", protocol.UPDATE_FROM_DISK, body, timeout=self.request_timeout_s)

    def close(self) -> None:
        """Leave the broadcast group, if one was made."""
        if self._broadcast.group is not None:
            self._broadcast.close(())

    def _end_sessions(self, engines: Sequence[Engine]) -> None:
        """Close weight-update sessions that an interrupted update left open (where there are any)."""
        for engine in engines:
            with contextlib.suppress(EngineRequestError):
                self._call_once(engine, protocol.END_WEIGHT_UPDATE, {})

    def _push(self, bucket: Bucket, written: tuple[Path, int], weight_version: str, transport: str, failed: dict[Engine, EngineError]) -> None:
        """Send one bucket to every engine that has not failed during this update."""
        live = [engine for engine in self.engines if engine not in failed]
        if transport == "nccl":
            if self._broadcast.group is None:
                return  # a failed broadcast broke the group: the snapshot reloads every engine
            failed.update(self._broadcast.push(live, bucket, weight_version))
        elif transport == "tensor":

            def send(engine: Engine) -> None:
                ranks = engine.tensor_parallel
                payloads = hf_file_payloads(*written, bucket, ranks) if engine.kind == "hf" else cuda_ipc_payloads(bucket, ranks)
                self._call_once(engine, protocol.UPDATE_FROM_TENSOR, protocol.update_from_tensor_body(payloads, weight_version))

            self._each(live, failed, send)

    def _connect_broadcast(self, failed: dict[Engine, EngineError]) -> None:
        live = [engine for engine in self.engines if engine not in failed]
        if self._broadcast.ready_for(live):
            return
        try:
            self._broadcast.connect(live)
        except EngineError as error:
            failed.update((engine, error) for engine in live)

    def _each(self, engines: Sequence[Engine], failed: dict[Engine, EngineError], action: Callable[[Engine], None]) -> None:
        """Run ``action`` on every engine not yet failed, concurrently; a dead or stalled engine joins ``failed``."""
        calls = {engine: self._pool.submit(action, engine) for engine in engines if engine not in failed}
        for engine, call in calls.items():
            error = call.exception()
            if isinstance(error, EngineRequestError):
                raise error
            if isinstance(error, EngineError):
                failed[engine] = error
            elif error is not None:
                raise error

    def _call_once(self, engine: Engine, path: str, body) -> None:
        engine.call("POST", path, body, timeout=self.request_timeout_s)
