"""Rollout engines behind one client: SGLang servers on GPUs, the embedded ``hf`` server anywhere.

:class:`EngineGroup` is the client (generate, update_weights, release/resume memory, flush_cache,
health, shutdown); :class:`SamplingParams` and :class:`Sample` are what goes in and comes out.
See :mod:`megarl.rollout.group` for spreading, :mod:`megarl.rollout.supervision` for fault
handling, :mod:`megarl.rollout.sampling` for log-prob and seed semantics,
:mod:`megarl.rollout.weight_updates` and :mod:`megarl.rollout.transports` for weight updates, and
:mod:`megarl.rollout.embedded` for the ``hf`` engine.
"""

from megarl.rollout.errors import (
    EngineDead,
    EngineError,
    EngineRequestError,
    EngineStartError,
    EngineTimeout,
    RestartBudgetExhausted,
)
from megarl.rollout.group import EngineGroup, resolve_engine
from megarl.rollout.sampling import Sample, SamplingParams

__all__ = [
    "EngineDead",
    "EngineError",
    "EngineGroup",
    "EngineRequestError",
    "EngineStartError",
    "EngineTimeout",
    "RestartBudgetExhausted",
    "Sample",
    "SamplingParams",
    "resolve_engine",
]
