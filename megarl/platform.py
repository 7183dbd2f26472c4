"""Where megarl runs: the device, the collective backend, and the optional accelerators.

One process per rank, started by ``torchrun`` (or run as a plain single process): the rank, the
world size and the rendezvous come from torchrun's environment. CUDA machines use nccl and one GPU
per local rank; machines without CUDA use gloo on the CPU, and megatron-core is made to run there
by :mod:`megarl.megatron_compat`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import socket

import torch
import torch.distributed as dist

from megarl import megatron_compat


@dataclasses.dataclass(frozen=True, slots=True)
class Platform:
    """What this process runs on. Built once by :func:`detect`."""

    device: torch.device
    """The device this rank computes on: ``cuda:<local rank>`` or ``cpu``."""
    backend: str
    """The torch.distributed backend: ``nccl`` on CUDA, ``gloo`` otherwise."""
    has_transformer_engine: bool
    """Transformer Engine imports (its layer specs are used when present)."""
    has_flash_attn: bool
    """flash-attn is installed."""
    has_apex: bool
    """NVIDIA apex is installed (a source build; not on PyPI)."""
    has_sglang: bool
    """SGLang is installed (the GPU rollout engine)."""

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _transformer_engine_usable() -> bool:
    # TE's PyTorch extension only loads against CUDA; an installed wheel on a CPU machine is inert.
    if not torch.cuda.is_available() or not _importable("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def detect() -> Platform:
    """Inspect the machine: CUDA or not, and which optional accelerators import."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return Platform(
        device=device,
        backend=backend,
        has_transformer_engine=_transformer_engine_usable(),
        has_flash_attn=torch.cuda.is_available() and _importable("flash_attn"),
        has_apex=_importable("apex"),
        has_sglang=_importable("sglang"),
    )


def current_device() -> torch.device:
    """The device this rank computes on: its CUDA device (set by :func:`init_distributed`), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> Platform:
    """Initialise torch.distributed for this process and prepare megatron-core for the platform.

    Under torchrun the rank, world size and rendezvous come from its environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). A plain ``python`` process becomes a world
    of one on a free local port. Idempotent.

    Returns:
        The detected :class:`Platform`.
    """
    platform = detect()
    if platform.is_cuda:
        torch.cuda.set_device(platform.device)
    else:
        megatron_compat.enable_cpu()
    if not platform.has_transformer_engine:
        megatron_compat.fix_missing_transformer_engine()
    megatron_compat.repair_padded_and_packed_paths()
    if dist.is_initialized():
        return platform
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=platform.backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=platform.backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    return platform
