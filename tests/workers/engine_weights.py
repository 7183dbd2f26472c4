"""Read a model's weights back from a rollout engine, for the checks that compare them (the rollout
tests, ``from tests.workers.engine_weights import read_weights``, and the torchrun workers here,
``from engine_weights import read_weights``)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

import torch

READERS = 16
"""Requests in flight together. One at a time, each weight's round trip to the hf engine's server
costs tens of milliseconds whatever its size: the 63 weights of the bundled tiny MoE took seconds."""


def read_weights(engines, names: Iterable[str], engine_index: int = 0) -> dict[str, torch.Tensor]:
    """Each weight of ``names`` as engine ``engine_index`` of the group ``engines`` holds it
    (:meth:`~megarl.rollout.EngineGroup.read_weight`, every row), by name."""
    names = list(names)
    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        held = pool.map(lambda name: torch.tensor(engines.read_weight(name, engine_index)), names)
        return dict(zip(names, held))
