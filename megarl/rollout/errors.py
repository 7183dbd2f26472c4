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
    """The engine answered with an error (bad request, failed weight update, aborted generation).

    Attributes:
        status: the HTTP status of the answer, None when the error is in an answer of status 200.
    """

    def __init__(self, engine: str, message: str, status: int | None = None):
        super().__init__(engine, message)
        self.status = status


class EngineMisconfigured(EngineError):
    """The engine runs without a setting the run needs (it does not return routed experts while
    ``algorithm.routing_replay`` is ``r3``): bad input, refused at start."""


class EngineStartError(EngineError):
    """A launched engine did not become healthy within the start-up timeout."""


class RestartBudgetExhausted(EngineError):
    """An engine failed after the run had used every restart it was allowed."""
