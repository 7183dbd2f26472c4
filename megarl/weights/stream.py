"""The weight stream: the policy's Megatron shards -> HF tensors in flat buckets, on one rank.

Built once after the model, it plans every copy (:mod:`megarl.weights.planner`); each step it only
moves bytes::

    stream = WeightStream(chunks, spec, pg_collection, bucket_mb=512, dtype=torch.bfloat16)
    ...
    buckets = stream.buckets()               # every rank iterates it to the end
    if rank == 0:
        engines.update_weights(buckets, version=step + 1)   # the destination consumes the buckets
    for _ in buckets:                        # the other ranks drive their sends
        pass

Per bucket, the ranks that hold shards the destination lacks (other tensor-, pipeline- and
expert-parallel ranks) pack them, cast to the stream's dtype, into one message and send it to the
destination; the destination receives the messages into a staging buffer and runs one copy plan
that writes every HF tensor of the bucket, reading its own shards in place and the others from
staging. This is a gather of exactly the bytes the bucket needs to the one rank that assembles it;
an all-gather would move them to every tensor-parallel peer for nothing.

Double buffering: on the destination a background thread fills bucket ``k + 1`` (receives, then
copies) while the consumer holds bucket ``k``. **Contract:** a bucket is the consumer's until it
asks for the next one; then its buffer is refilled with bucket ``k + 2``. A consumer that hands a
bucket to something that reads it later must wait for that (or copy the bucket) before asking for
the next, or build the stream with ``recycle_buffers=False``: every bucket then gets a fresh
buffer from the allocator, and the one handed over is only dropped. That is the CUDA-IPC case:
SGLang answers an update before its device has finished reading the bucket, and PyTorch keeps
a block shared over CUDA IPC out of the allocator until the reader has synchronized and let go,
which a buffer kept and rewritten here would bypass. Senders keep two message buffers, so packing
message ``k + 1`` overlaps sending ``k``.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from megarl.weights.bucket import Bucket, TensorMeta
from megarl.weights.copy_plan import dtype_code, execute_copy_plan
from megarl.weights.layout import choose_senders, gather_model_layout
from megarl.weights.planner import BucketPlan, plan_rank

DEFAULT_BUCKET_MB = 512
"""slime's default update bucket. Larger buckets mean fewer engine update calls; on the CPU the
engine copies 64 MiB and 512 MiB buckets at about the same rate (docs/benchmarks.md, "Weight
stream: C++ resharding engine"). Colocated GPU runs short of memory lower it: the destination
holds two buckets and a staging buffer."""

_DONE = object()


class WeightStream:
    """Streams the policy's weights, in HF layout, as buckets to one destination rank.

    Construction is collective (every rank of the default group builds the stream, with its own
    chunks) and plans everything; :meth:`buckets` then runs once per step on every rank.

    Args:
        chunks: this rank's model chunks (:func:`megarl.models.builder.build_model`).
        spec: their :class:`~megarl.models.builder.ModelSpec`.
        pg_collection: the process groups.
        bucket_mb: the bucket cap in MiB. A parameter larger than that (a big embedding) travels
            alone in a bucket of its own size.
        dtype: the dtype the buckets hold (float32, bfloat16 or float16); None keeps each
            parameter's.
        dst: the global rank that assembles the buckets and yields them.
        recycle_buffers: refill the two bucket buffers (false: a fresh buffer for every bucket,
            for consumers that pass buckets over CUDA IPC).
        nearby: the ranks on the destination's node: a shard the destination lacks is sent from
            one of them when one holds it (a run on several nodes streams to every node's first
            rank, each from its own node where the node holds a whole replica).

    Attributes:
        planning_seconds: time spent building the plans (once, at construction).
    """

    def __init__(
        self,
        chunks,
        spec,
        pg_collection,
        *,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        dtype: torch.dtype | None = None,
        dst: int = 0,
        recycle_buffers: bool = True,
        nearby: Sequence[int] = (),
    ):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb ({bucket_mb}) must be positive")
        if not 0 <= dst < dist.get_world_size():
            raise ValueError(f"dst ({dst}) is not a rank of the {dist.get_world_size()}-rank world")
        if dtype is not None:
            dtype_code(dtype)
        start = time.perf_counter()
        layout = gather_model_layout(chunks, spec, pg_collection)
        self._rank = dist.get_rank()
        self._dst = dst
        self._recycle = recycle_buffers
        self._plans: list[BucketPlan] = plan_rank(
            layout.parameters,
            choose_senders(layout.holders, dst, nearby),
            layout.local,
            rank=self._rank,
            dst=dst,
            dtype=dtype,
            bucket_bytes=int(bucket_mb * 2**20),
        )
        # The plans read the parameters in place: an nn.Parameter stays the same object when its
        # data is swapped (offloading), so these lists stay valid from step to step.
        self._sources = [[layout.local_parameters[i] for i in plan.local_tensors] for plan in self._plans]
        # Its own communicator, so the stream's messages never interleave with the trainer's.
        self._group = dist.new_group()
        self._device = _device_of(layout.local_parameters)
        self._buffers: list[torch.Tensor] | None = None
        self.planning_seconds = time.perf_counter() - start

    @property
    def is_destination(self) -> bool:
        """Whether this rank assembles and yields the buckets."""
        return self._rank == self._dst

    @property
    def bucket_metas(self) -> list[tuple[TensorMeta, ...]]:
        """Every bucket's tensors, as each step yields them (known on every rank)."""
        return [plan.metas for plan in self._plans]

    def buckets(self) -> Iterator[Bucket]:
        """This step's buckets, on the destination rank; nothing elsewhere.

        Every rank must iterate to the end: the iteration drives the transfers. A destination that
        stops early still completes the step's transfers (the remaining buckets are dropped).
        The parameters must keep the shapes and dtypes they had when the stream was built (the
        engine refuses a plan that reaches past a tensor or reads it as another dtype).

        Yields:
            :class:`~megarl.weights.bucket.Bucket` s with ``buffer: [nbytes]`` uint8 on the model's
            device. A bucket is valid until the consumer asks for the next one (its buffer is then
            refilled in the background).
        """
        if self.is_destination:
            yield from self._assemble()
        else:
            self._send()

    def release_buffers(self) -> None:
        """Free the bucket, staging and message buffers (colocated training wants the memory back
        between updates); the next :meth:`buckets` allocates them again."""
        self._buffers = None

    def _allocate(self) -> list[torch.Tensor]:
        """[staging, out, out]: two output buffers (buckets, or messages on senders)."""
        if self._buffers is None:
            out_bytes = max((plan.out_bytes for plan in self._plans), default=0)
            staging_bytes = max((plan.staging_bytes for plan in self._plans), default=0) if self.is_destination else 0
            self._buffers = [
                torch.empty(size, dtype=torch.uint8, device=self._device)
                for size in (staging_bytes, out_bytes, out_bytes)
            ]
        return self._buffers

    @torch.no_grad()
    def _send(self) -> None:
        staging, *outs = self._allocate()
        pending: list[dist.Work | None] = [None, None]
        sent = 0
        for index, plan in enumerate(self._plans):
            if plan.out_bytes == 0:
                continue
            slot = sent % 2
            if pending[slot] is not None:
                pending[slot].wait()
            execute_copy_plan(plan.plan, [staging, *self._sources[index]], outs[slot])
            pending[slot] = dist.isend(outs[slot][: plan.out_bytes], self._dst, group=self._group, tag=index)
            sent += 1
        for work in pending:
            if work is not None:
                work.wait()

    def _assemble(self) -> Iterator[Bucket]:
        staging, *outs = self._allocate()
        cuda = self._device.type == "cuda"

        @torch.no_grad()
        def fill(index: int, out: torch.Tensor) -> Bucket:
            plan = self._plans[index]
            works = [
                dist.irecv(staging[m.offset : m.offset + m.nbytes], m.sender, group=self._group, tag=index)
                for m in plan.messages
            ]
            for work in works:
                work.wait()
            execute_copy_plan(plan.plan, [staging, *self._sources[index]], out)
            if cuda:
                # The consumer may hand the bucket to another process (CUDA IPC): it must be complete.
                torch.cuda.current_stream().synchronize()
            return Bucket(buffer=out[: plan.nbytes], metas=list(plan.metas))

        yield from double_buffered(fill, len(self._plans), outs, device=self._device, recycle=self._recycle)


def double_buffered(
    fill: Callable[[int, torch.Tensor], Bucket],
    count: int,
    buffers: Sequence[torch.Tensor],
    device: torch.device | None = None,
    recycle: bool = True,
) -> Iterator[Bucket]:
    """Yield ``fill(k, buffer)`` for ``k < count``, filled by a background thread ahead of the consumer.

    The thread fills each bucket into a free buffer. Asking for bucket ``k + 1`` frees bucket
    ``k``'s buffer, which then receives bucket ``k + 2`` while the consumer holds ``k + 1``; with two
    buffers, bucket ``k + 1`` is filled while the consumer holds bucket ``k``. A consumer that stops
    early lets the thread finish (``fill`` may drive transfers that other ranks wait on); an
    exception in ``fill`` is raised on the consumer's side.

    Args:
        fill: writes bucket ``k`` into the given buffer and returns it (a view of the buffer).
        count: the number of buckets.
        buffers: the buffers to cycle through (two for double buffering).
        device: the CUDA device the thread runs its work on; None on the CPU.
        recycle: refill a released buffer; false: drop it and fill a new one of its size.
    """
    free: queue.SimpleQueue = queue.SimpleQueue()
    ready: queue.SimpleQueue = queue.SimpleQueue()
    for buffer in buffers:
        free.put(buffer)

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for index in range(count):
                buffer = free.get()
                ready.put((fill(index, buffer), buffer))
            ready.put(_DONE)
        except BaseException as error:  # re-raised on the consumer's thread
            ready.put(error)

    worker = threading.Thread(target=produce, name="megarl-weight-stream", daemon=True)
    worker.start()
    held = None
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            bucket, held = item
            yield bucket
            # The consumer asked for the next bucket: it is done with this one.
            free.put(held if recycle else torch.empty_like(held))
            held = None
    finally:
        if held is not None:
            # Stopped early: let the producer finish so every transfer it drives completes.
            free.put(held)
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    worker.join()
                    raise item
                free.put(item[1])
        worker.join()


def _device_of(parameters: list[torch.nn.Parameter]) -> torch.device:
    if parameters:
        return parameters[0].device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
