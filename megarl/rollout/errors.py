"""Errors of the rollout engines: every one names the engine it came from and what to do."""

from __future__ import annotations


class EngineError(RuntimeError):
    """An engine call failed.

    Attributes:
        engine: the engine's name, e.g. ``hf-0``, with its URL (and pid when megarl launched it).
    """

    def __init__(self, engine: str, message: str):
        super().__init__(f"rollout engine {engine}: {message}")
        self.engine = engine


class EngineTimeout(EngineError):
    """The engine did not answer within the call's timeout (stalled, overloaded, or stopped)."""


class EngineDead(EngineError):
    """The engine's process exited or its connection was refused or reset."""


class EngineRequestError(EngineError):
    """The engine answered with an error (bad request, failed weight update, aborted generation)."""


class EngineStartError(EngineError):
    """A launched engine did not become healthy within the start-up timeout."""


class RestartBudgetExhausted(EngineError):
    """An engine failed after the run had used every restart it was allowed."""
