"""How a weight bucket reaches an engine: tensor handles, a broadcast group, or files.

- ``tensor`` (same host): ``/update_weights_from_tensor`` with ``load_format: flattened_bucket``.
  SGLang gets, per tensor-parallel rank, a ``MultiprocessingSerializer`` payload of
  ``{"flattened_tensor": buffer, "metadata": [FlattenedTensorMetadata, ...]}`` whose CUDA tensor
  pickles as a CUDA-IPC handle (:func:`cuda_ipc_payloads`; the buffer must stay alive until the
  engine answers). The ``hf`` engine gets the handle of the bucket's file in shared memory
  (:func:`hf_file_payloads`).
- ``nccl`` (disaggregated): a broadcast group between the client's process (rank 0) and every
  engine rank (:class:`BroadcastGroup`): each bucket is announced with
  ``/update_weights_from_distributed`` and sent with one broadcast of its buffer. The backend is
  NCCL for SGLang and gloo for the ``hf`` engine on CPU.
- ``disk``: the engines reload the snapshot directory with ``/update_weights_from_disk`` after the
  last bucket (:mod:`megarl.rollout.snapshot`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import socket
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megarl.rollout import protocol
from megarl.rollout.bucket_files import encode_handle
from megarl.rollout.engine import Engine, free_port
from megarl.rollout.errors import EngineError
from megarl.rollout.update_group import join_update_group, leave_update_group
from megarl.weights.bucket import Bucket

TRANSPORTS = ("tensor", "nccl", "disk")


def hf_file_payloads(path: Path, data_offset: int, bucket: Bucket, ranks: int) -> list[str]:
    """``serialized_named_tensors`` for the ``hf`` engine: the bucket file's handle per rank."""
    return [encode_handle(path, data_offset, bucket)] * ranks


def flattened_metadata(bucket: Bucket, metadata_class) -> list:
    """The bucket's metadata as SGLang's ``FlattenedTensorMetadata`` objects (byte offsets; its
    ``numel`` counts bytes, as SGLang's own bucket builder sets it)."""
    return [
        metadata_class(name=meta.name, shape=torch.Size(meta.shape), dtype=meta.dtype, start_idx=meta.start, end_idx=meta.end, numel=meta.end - meta.start)
        for meta in bucket.metas
    ]


def cuda_ipc_payloads(bucket: Bucket, ranks: int) -> list[str]:
    """``serialized_named_tensors`` for a colocated SGLang engine: one CUDA-IPC payload per rank.

    Each rank gets its own serialization, as SGLang requires (a rank deserializes only its own
    entry, which keeps the producer's CUDA-IPC reference counting right).

    Raises:
        ValueError: the bucket is not on a CUDA device, or a tensor in it is not aligned to its
            element size (SGLang views each slice as its dtype; the trainer's stream has one
            dtype, so its buckets always are).
    """
    misaligned = [meta.name for meta in bucket.metas if not meta.aligned]
    if misaligned:
        raise ValueError(
            f"{misaligned[0]} starts at a byte offset that is not a multiple of its element size, which SGLang's "
            "flattened bucket cannot view: stream one dtype (WeightStream(dtype=...)), or use the nccl or disk transport"
        )
    if bucket.buffer.device.type != "cuda":
        raise ValueError(
            f"the tensor transport to SGLang passes CUDA-IPC handles; the bucket is on {bucket.buffer.device}. "
            "Stream the weights on the GPU, or set rollout.weight_transport to nccl or disk"
        )
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    monkey_patch_torch_reductions()
    payload = {"flattened_tensor": bucket.buffer[: bucket.nbytes], "metadata": flattened_metadata(bucket, FlattenedTensorMetadata)}
    return [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(ranks)]


def _master_address(engines: Sequence[Engine]) -> str:
    """This host as the engines can reach it: loopback when they all run here."""
    hosts = {engine.url.split("//", 1)[1].rsplit(":", 1)[0] for engine in engines}
    if hosts <= {"127.0.0.1", "localhost"}:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


class BroadcastGroup:
    """The client's side of the weight-update broadcast group of a set of engines.

    Args:
        backend: ``nccl`` (SGLang) or ``gloo`` (the ``hf`` engine).
        timeout_s: limit of joining and of every broadcast.
        pool: threads for the concurrent engine calls (an engine's call returns only once its
            broadcast has arrived).
    """

    def __init__(self, backend: str, timeout_s: float, pool: concurrent.futures.Executor):
        self.backend = backend
        self.timeout_s = timeout_s
        self.pool = pool
        self.group = None
        self.members: tuple[tuple[Engine, int], ...] = ()
        """``(engine, incarnation)`` of each engine that joined the group."""

    def ready_for(self, engines: Sequence[Engine]) -> bool:
        """Whether the group holds exactly these engines, none restarted since it was made."""
        return self.group is not None and self.members == tuple((engine, engine.incarnation) for engine in engines)

    def connect(self, engines: Sequence[Engine]) -> None:
        """(Re)make the group over ``engines``: they join concurrently while this process joins as rank 0.

        Raises:
            EngineError: an engine could not join (the group is left unmade).
        """
        self.close(engines)
        world_size = 1 + sum(engine.tensor_parallel for engine in engines)
        address, port = _master_address(engines), free_port("")
        offsets = [1 + sum(engine.tensor_parallel for engine in engines[:index]) for index in range(len(engines))]
        calls = [
            self.pool.submit(
                engine.call, "POST", protocol.INIT_UPDATE_GROUP,
                protocol.init_update_group_body(address, port, offset, world_size, self.backend), timeout=self.timeout_s,
            )
            for engine, offset in zip(engines, offsets)
        ]
        try:
            group = join_update_group(address, port, 0, world_size, self.backend, protocol.UPDATE_GROUP_NAME, self.timeout_s)
        except RuntimeError:
            group = None
        errors = [call.exception() for call in calls if call.exception() is not None]
        if errors or group is None:
            if group is not None:
                leave_update_group(group)
            if errors:
                raise errors[0]
            raise EngineError(engines[0].label, f"the weight-update group did not form within {self.timeout_s:g} s")
        self.group = group
        self.members = tuple((engine, engine.incarnation) for engine in engines)

    def push(self, engines: Sequence[Engine], bucket: Bucket, weight_version: str) -> dict[Engine, EngineError]:
        """Announce one bucket to every engine and broadcast it.

        Returns:
            The engines whose call failed, with the error. Any failure fails every engine: a
            broadcast with a member gone can never complete, so the group is aborted and closed
            (the caller then reloads the engines from the snapshot).
        """
        aligned = all(meta.aligned for meta in bucket.metas)
        body = protocol.update_from_distributed_body(bucket.metas, weight_version, protocol.FLATTENED_BUCKET if aligned else None)
        calls = {engine: self.pool.submit(engine.call, "POST", protocol.UPDATE_FROM_DISTRIBUTED, body, timeout=self.timeout_s) for engine in engines}
        failures: dict[Engine, EngineError] = {}
        tensors = [bucket.buffer[: bucket.nbytes]] if aligned else [tensor.contiguous() for _, tensor in bucket.named_tensors()]
        try:
            for tensor in tensors:
                # Asynchronous, then waited on with a limit: with NCCL a broadcast returns at once
                # and a missing member would otherwise stall the device stream for good.
                dist.broadcast(tensor, group_src=0, group=self.group, async_op=True).wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            failures = {engine: EngineError(engine.label, f"weight broadcast failed: {error}") for engine in engines}
        for engine, call in calls.items():
            error = call.exception()
            if isinstance(error, EngineError):
                failures.setdefault(engine, error)
            elif error is not None:
                raise error
        if failures:
            first = next(iter(failures.values()))
            for engine in engines:
                failures.setdefault(engine, EngineError(engine.label, f"the weight-update group broke when another member failed ({first})"))
            self.close([engine for engine in engines if calls[engine].exception() is None], abort=True)
        return failures

    def close(self, engines: Sequence[Engine], *, abort: bool = False) -> None:
        """Leave the group; ask ``engines`` that are still members to destroy their side.

        Args:
            abort: first abort this side's pending collectives (NCCL), which a broadcast that a
                member never joined would otherwise hold forever.
        """
        if self.group is None:
            return
        group, self.group = self.group, None
        if abort:
            with contextlib.suppress(Exception):  # gloo has no abort; its collectives time out
                c10d._abort_process_group(group)
        members = {engine for engine, incarnation in self.members if engine.incarnation == incarnation}
        for engine in engines:
            if engine in members:
                with contextlib.suppress(EngineError):
                    engine.call("POST", protocol.DESTROY_UPDATE_GROUP, protocol.destroy_update_group_body(), timeout=self.timeout_s)
        with contextlib.suppress(Exception):  # already gone after an abort
            leave_update_group(group)
        self.members = ()

