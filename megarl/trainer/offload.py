"""Colocated memory: the trained models' state parked in host memory while the engines generate.

With ``rollout.colocate`` the engines and the trainer share every GPU. The engines give their
memory back during the update (``/release_memory_occupation``); ``train.offload`` is the other
half: after the weight sync, before the engines take their KV cache back, the chosen state of the
policy (and the critic) leaves the device, and it comes back before the forward passes::

    step s:  rollout ... | to_device | forward, update | sync weights | to_host | engines resume KV
    fit:     to_host before step 0's rollout; Run.save and Run.export_hf bring it back for the save

What moves (verl: ``actor.megatron.param_offload`` / ``grad_offload`` / ``optimizer_offload``,
``offload_megatron_model_to_cpu`` and ``offload_megatron_optimizer``; slime: torch_memory_saver
around the whole training process; OpenRLHF: ``deepspeed_enable_sleep``):

- ``params``: Megatron's DDP keeps a model chunk's parameters in contiguous buffers
  (``DistributedDataParallel.buffers`` and ``expert_parallel_buffers``, each ``param_data`` when
  the optimizer is distributed) and every parameter is a view into one; parameters outside such a
  buffer (the non-distributed optimizer) are their own storages.
- ``grads``: the buffers' ``grad_data`` (each parameter's ``main_grad`` a view into one).
- ``optimizer``: the optimizer's own tensors: its fp32 main parameters (with the distributed
  optimizer, this rank's shard; with fp32 parameters these are views of ``param_data`` and move
  with ``params``) and the Adam moments (``optimizer.state``).

A storage is moved whole, once, however many views share it: its bytes are copied into a host
buffer (pinned where CUDA is, so the copies run asynchronously; one synchronisation for all) and
the storage is resized to 0, which frees the device memory while every tensor and view keeps its
identity. Restoring resizes the same storage and copies the bytes back, so ``param.data``,
``main_grad`` and the optimizer's keys alias the buffers as before, bit for bit the same. On CUDA
the freed blocks then go back to the driver (``torch.cuda.empty_cache``) so the engines, other
processes, can map them.

Departures from verl, deliberate: gradients are not copied. Every optimizer step, taken or skipped,
ends by zeroing them (:meth:`TrainModel.optimizer_step <megarl.trainer.model.TrainModel.optimizer_step>`),
so between steps they are zeros: they are released and zeroed on restore (as Megatron's own
``_ParamAndGradBuffer.reload_from_cpu`` does), which costs no transfer. The list applies to the
critic as to the policy. The Megatron distillation teacher (forward only) and the host copy of the
reference are not moved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Sequence

import torch

from megarl.platform import current_device

KINDS = ("params", "grads", "optimizer")
"""What ``train.offload`` may list, in the order the state is gathered."""


@dataclasses.dataclass
class _Parked:
    """One device storage released to the host (``host`` None: zeros on restore)."""

    storage: torch.UntypedStorage
    device: torch.device
    nbytes: int
    host: torch.Tensor | None


def _bytes(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A ``uint8 [nbytes]`` tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Offload:
    """Moves the chosen state of trained models between the device and host memory.

    Args:
        models: the :class:`~megarl.trainer.model.TrainModel` s whose state moves (the policy's, the
            critic's); their DDP-wrapped chunks (``models``) and optimizer are read.
        kinds: a subset of :data:`KINDS` (``train.offload``); empty: every call does nothing.
    """

    def __init__(self, models: Sequence, kinds: Sequence[str]):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"offload kinds {sorted(unknown)} are not among {KINDS}")
        self.models = list(models)
        self.kinds = tuple(kind for kind in KINDS if kind in kinds)
        self.device = current_device()
        self._parked: list[_Parked] = []
        self._host: dict[tuple[str, int], torch.Tensor] = {}
        self._totals: dict[str, float] = {}

    @property
    def offloaded(self) -> bool:
        """Whether the state is in host memory now."""
        return bool(self._parked)

    def tensors(self, kind: str) -> list[torch.Tensor]:
        """One tensor per device storage that ``kind`` covers (each storage once, in a fixed order;
        the optimizer's leave out what the parameters and gradients hold)."""
        model_storages: set[int] = set()
        if kind == "optimizer":
            model_storages = {_storage_key(tensor) for name in ("params", "grads") for tensor in self.views(name)}
        seen: set[int] = set()
        unique = []
        for tensor in self.views(kind):
            key = _storage_key(tensor)
            if tensor.device != self.device or key == 0 or key in seen or key in model_storages:
                continue
            seen.add(key)
            unique.append(tensor)
        return unique

    def views(self, kind: str) -> Iterator[torch.Tensor]:
        """Every tensor ``kind`` covers, views included (each parameter and ``main_grad`` beside
        the buffers they live in, an fp32 main weight beside the buffer it may be a view of)."""
        for model in self.models:
            buffers = [buffer for ddp in model.models for buffer in ddp.buffers + ddp.expert_parallel_buffers]
            parameters = [parameter for ddp in model.models for parameter in ddp.parameters()]
            if kind == "params":
                yield from (buffer.param_data for buffer in buffers if buffer.param_data is not None)
                yield from (parameter.data for parameter in parameters)
            elif kind == "grads":
                yield from (buffer.grad_data for buffer in buffers)
                yield from (parameter.main_grad for parameter in parameters if getattr(parameter, "main_grad", None) is not None)
            else:
                for megatron_optimizer in getattr(model.optimizer, "chained_optimizers", [model.optimizer]):
                    adam = megatron_optimizer.optimizer
                    if adam is None:
                        continue  # a chained optimizer's part with no parameters on this rank
                    for group in adam.param_groups:
                        yield from group["params"]
                    for state in adam.state.values():
                        yield from (value for value in state.values() if isinstance(value, torch.Tensor))

    def to_host(self) -> None:
        """Copy the chosen state to host memory and release its device storage (nothing when it
        is already on the host, or nothing is chosen)."""
        if self.offloaded or not self.kinds:
            return
        start = time.perf_counter()
        parked = []
        for kind in self.kinds:
            for index, tensor in enumerate(self.tensors(kind)):
                storage = tensor.untyped_storage()
                nbytes = storage.nbytes()
                host = None
                if kind != "grads":
                    host = self._host_buffer(kind, index, nbytes)
                    host.copy_(_bytes(storage, tensor.device), non_blocking=True)
                parked.append(_Parked(storage, tensor.device, nbytes, host))
        # The copies read the storages: they must be done before the storages are freed.
        _synchronize(self.device)
        for entry in parked:
            entry.storage.resize_(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._parked = parked
        self._add("offload/bytes_to_host", sum(entry.nbytes for entry in parked if entry.host is not None))
        self._add("offload/bytes_released", sum(entry.nbytes for entry in parked))
        self._add("time/offload_s", time.perf_counter() - start)

    def to_device(self) -> None:
        """Re-allocate the released storages and copy the state back (gradients: zeros); nothing
        when the state is on the device."""
        if not self.offloaded:
            return
        start = time.perf_counter()
        for entry in self._parked:
            entry.storage.resize_(entry.nbytes)
            on_device = _bytes(entry.storage, entry.device)
            if entry.host is None:
                on_device.zero_()
            else:
                on_device.copy_(entry.host, non_blocking=True)
        _synchronize(self.device)
        self._add("offload/bytes_to_device", sum(entry.nbytes for entry in self._parked if entry.host is not None))
        self._add("time/onload_s", time.perf_counter() - start)
        self._parked = []

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Within the block the state is on the device (a checkpoint save, the HF export); it
        goes back to the host after it if it was there."""
        was_offloaded = self.offloaded
        self.to_device()
        try:
            yield
        finally:
            if was_offloaded:
                self.to_host()

    def metrics(self) -> dict[str, float]:
        """Bytes moved and seconds spent since the last call: ``offload/bytes_to_host``,
        ``offload/bytes_to_device``, ``offload/bytes_released``, ``time/offload_s``,
        ``time/onload_s`` (all 0 until something moves; none when nothing is chosen)."""
        if not self.kinds:
            return {}
        names = ("offload/bytes_to_host", "offload/bytes_to_device", "offload/bytes_released", "time/offload_s", "time/onload_s")
        totals = {name: self._totals.get(name, 0.0) for name in names}
        self._totals = {}
        return totals

    def _add(self, name: str, value: float) -> None:
        self._totals[name] = self._totals.get(name, 0.0) + value

    def _host_buffer(self, kind: str, index: int, nbytes: int) -> torch.Tensor:
        """The host buffer of ``kind``'s ``index``-th storage, allocated (pinned on CUDA) once and
        reused every step while the storage keeps its size."""
        host = self._host.get((kind, index))
        if host is None or host.numel() != nbytes:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._host[(kind, index)] = host
        return host


def _storage_key(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage (0 when it holds nothing)."""
    return tensor.untyped_storage().data_ptr()
