"""The main of an environment worker process (started by :class:`megarl.agents.workers.EnvironmentPool`).

A worker loads the environment class once, answers the pool's start-up check, then hosts many
episodes, one environment instance each, answering one request at a time over its pipe:

| request | answer |
| --- | --- |
| ``("reset", episode_id, row)`` | ``("ok", first observation)``: a new instance, reset |
| ``("step", episode_id, model_turn)`` | ``("ok", StepResult)``; an instance that is done is dropped |
| ``("replay", episode_id, row, model_turns)`` | ``("ok", None)``: the episode rebuilt (reset, then each turn) |
| ``("close", episode_id)`` | none: the instance is dropped |

User code that raises, and results that break the contract
(:func:`megarl.agents.environment.checked_step_result`), answer ``("error", message)`` and drop
that episode's instance; the worker carries on. It exits when the pool closes its pipe, and kills
its process group when the pool's lifeline pipe closes (the pool closed, or its process is gone).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any

from megarl.agents.processes import become_worker
from megarl.agents.environment import (
    EnvironmentLoadError,
    EnvironmentResultError,
    Messages,
    StepResult,
    check_env_kwargs,
    checked_first_observation,
    checked_step_result,
    load_environment_class,
    tool_schemas,
)


def serve(spec: str, registering_module: str | None, env_kwargs: dict, requests, lifeline) -> None:
    """A worker's main: load the environment class, answer ``("ok", (class name, tool schemas))``
    or ``("error", message)``, then serve requests until the pool closes the pipe."""
    become_worker(lifeline)
    where = f"agent.environment = {spec!r}"
    try:
        if registering_module is not None:
            importlib.import_module(registering_module)  # registers the class in this process
        environment_class = load_environment_class(spec)
        check_env_kwargs(environment_class, env_kwargs, where)
        schemas = tool_schemas(environment_class, where)
    except EnvironmentLoadError as error:
        requests.send(("error", str(error)))
        return
    except Exception:  # noqa: BLE001 - reported to the pool, which raises it
        requests.send(("error", f"{where}: loading the environment failed:\n{traceback.format_exc(limit=-8)}"))
        return
    requests.send(("ok", (environment_class.__name__, schemas)))
    host = _EpisodeHost(environment_class, env_kwargs)
    while True:
        try:
            request = requests.recv()
        except EOFError:
            return
        reply = host.handle(request)
        if reply is not None:
            requests.send(reply)


class _UserCodeError(Exception):
    """User code raised; the message names the call and holds the user's part of the traceback."""


def _call_user(description: str, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any error of the environment fails its episode
        user_frames = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next, limit=-8))
        raise _UserCodeError(f"{description} raised {type(error).__name__}: {error}\n{user_frames}") from None


class _EpisodeHost:
    """A worker's episodes: one environment instance per open episode, by episode id."""

    def __init__(self, environment_class: type, env_kwargs: dict):
        self.environment_class = environment_class
        self.name = environment_class.__name__
        self.env_kwargs = env_kwargs
        self.episodes: dict[str, Any] = {}

    def handle(self, request: tuple) -> tuple[str, Any] | None:
        """``(kind, episode_id, *arguments)`` -> ``("ok", value)`` or ``("error", message)``; a
        ``close`` gets no answer. A failed episode's instance is dropped."""
        kind, episode_id, *arguments = request
        if kind == "close":
            self.episodes.pop(episode_id, None)
            return None
        try:
            if kind == "reset":
                return "ok", self.reset(episode_id, *arguments)
            if kind == "step":
                return "ok", self.step(episode_id, *arguments)
            self.replay(episode_id, *arguments)
            return "ok", None
        except (_UserCodeError, EnvironmentResultError) as error:
            self.episodes.pop(episode_id, None)
            return "error", str(error)

    def _create(self, row: dict) -> tuple[Any, Messages | None]:
        environment = _call_user(f"{self.name}(**env_kwargs)", self.environment_class, **self.env_kwargs)
        observation = _call_user(f"{self.name}.reset", environment.reset, row)
        return environment, checked_first_observation(self.name, observation)

    def reset(self, episode_id: str, row: dict) -> Messages | None:
        environment, observation = self._create(row)
        self.episodes[episode_id] = environment
        return observation

    def step(self, episode_id: str, model_turn: str) -> StepResult:
        environment = self.episodes[episode_id]
        result = checked_step_result(self.name, _call_user(f"{self.name}.step", environment.step, model_turn))
        if result.done:
            del self.episodes[episode_id]
        return result

    def replay(self, episode_id: str, row: dict, model_turns: list[str]) -> None:
        """Rebuild an episode whose worker was replaced: reset, then every earlier model turn."""
        environment, _ = self._create(row)
        for model_turn in model_turns:
            checked_step_result(self.name, _call_user(f"{self.name}.step", environment.step, model_turn))
        self.episodes[episode_id] = environment
