"""An OpenAI-compatible chat-completions endpoint in front of the engines, for agent programs that
speak only that protocol: every call of an episode is one model turn, recorded token-exactly into
the :class:`~megarl.agents.episode.Trajectory` that the built-in loop builds.

::

    with ChatEndpoint(engines, tokenizer, sampling, limits, tool_parser="hermes", tools=schemas) as endpoint:
        base_url = endpoint.open_episode("step 3/0/1", route=0, seed=17)   # the agent's OpenAI base_url
        ...                                                               # the agent plays its episode
        trajectory = endpoint.trajectory("step 3/0/1")

Route: ``POST /episodes/{episode_id}/v1/chat/completions``, the fields of
:mod:`megarl.agents.openai_protocol`.

How the calls become one trajectory. The first call's messages, rendered with its tools
(:func:`~megarl.agents.rendering.prompt_ids`), are the prompt. Each call samples one turn that
continues exactly the prompt plus everything recorded so far (seed ``resume_seed(seed, tokens so
far)``, as :func:`~megarl.agents.episode.run_episode` draws); the turn's ids and log-probs go into
the trajectory as the engine returned them (loss mask 1), and only its decoded text goes back to
the agent. A later call must send the conversation so far unchanged (the earlier call's messages,
then the assistant message this endpoint answered, compared by role, content and tool calls), and
the same tools, then tool or user messages: those are the observation, rendered after the turn's
end-of-turn token (:func:`~megarl.agents.rendering.observation_ids`) and recorded with loss mask
0. Nothing the model wrote is tokenised again, so an agent that rewrites its history is refused:
its conversation is no longer the one whose ids were sampled.

Limits, as in :mod:`megarl.agents.episode`: a call after ``max_turns`` turns is refused ("max
turns"; ``max_turns_reached``); a turn's ``max_new_tokens`` is the least of the request's, the
per-turn limit and what is left of ``max_response_tokens``; a call whose observation leaves no
token is refused ("token budget spent"; the trajectory's ``finish_reason`` is then ``length``, as
after a turn the budget cut).

Status codes: 400 for a request outside the protocol subset or the limits, 404 for an episode not
open, 409 while another call of the same episode generates, 500 when the engine failed (nothing is
recorded: the call may be sent again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading
from http import HTTPStatus
from typing import Any, Awaitable, Protocol, Sequence
from urllib.parse import quote

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse

from megarl.agents.episode import EpisodeLimits, Trajectory, TurnGenerator, after_turn
from megarl.agents.openai_protocol import ChatRequest, RequestError, added_messages, assistant_message, chat_completion, chat_message, declared_tools, read_request
from megarl.agents.parsers import tool_parser as named_parser
from megarl.agents.rendering import ChatTemplateError, observation_ids, prompt_ids
from megarl.rollout.embedded.server import listening_socket, uvicorn_server
from megarl.rollout.errors import EngineError
from megarl.rollout.sampling import Sample, SamplingParams, resume_seed


class TurnEngines(TurnGenerator, Protocol):
    """What the endpoint needs of the engines (:class:`~megarl.rollout.EngineGroup`): turns, each
    awaited on the engines' own event loop through ``run``."""

    def run(self, coroutine: Awaitable) -> concurrent.futures.Future: ...


@dataclasses.dataclass(slots=True)
class _Episode:
    """An open episode: where it generates and what its calls recorded."""

    route: int
    seed: int | None
    sampling: SamplingParams
    """How its turns are sampled (a round's, or validation's)."""
    trajectory: Trajectory | None = None
    """None until its first call is answered."""
    declarations: list[dict] = dataclasses.field(default_factory=list)
    """The tools of its first call, rendered into its prompt."""
    conversation: list[dict] = dataclasses.field(default_factory=list)
    """The last call's messages, then the answer (as :func:`chat_message` reads them)."""
    last_finish_reason: str = "stop"
    """The last turn's: ``length`` puts the end-of-turn token it lacks before the next observation."""
    busy: bool = False
    """A call is generating (read and written on the server's loop only)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Turn:
    """What one call asks the engine for, and what to record when the turn comes back."""

    request: ChatRequest
    prompt: list[int]
    observation: list[int]
    """The ids between the last turn and this one (empty on the first call)."""
    input_ids: list[int]
    max_new_tokens: int
    room: int
    """What was left of the episode's token budget for this turn."""
    seed: int | None


class ChatEndpoint:
    """The endpoint (see the module docstring), served by uvicorn on a background thread: one
    server for many episodes at once, its methods safe to call from any thread.

    Args:
        engines: the :class:`~megarl.rollout.EngineGroup` (or anything with its ``generate_turn``
            and ``run``).
        tokenizer: the policy's tokenizer, with the chat template that renders prompts and
            observations and its end-of-turn token as ``eos_token``.
        sampling: the sampling (``temperature``, ``top_p``, ``top_k``) of an episode opened
            without its own; its ``n``, ``max_new_tokens`` and ``seed`` are unused.
        limits: every episode's limits.
        tool_parser: the parser that reads tool calls in a turn's text (``agent.tool_parser``).
        tools: the declarations (``ToolSet.schemas()``) of a call that sends no ``tools``.
        host: the address to serve on.

    Raises:
        ValueError: an unknown parser, or a declaration outside megarl's tool schema subset.
    """

    def __init__(self, engines: TurnEngines, tokenizer: Any, sampling: SamplingParams, limits: EpisodeLimits, tool_parser: str, tools: Sequence[dict] = (), *, host: str = "127.0.0.1"):
        self.engines, self.tokenizer, self.sampling, self.limits, self.host = engines, tokenizer, sampling, limits, host
        self.parser = named_parser(tool_parser)
        self.tools = list(tools)
        declared_tools(self.tools, "ChatEndpoint tools")
        self.base_url: str | None = None
        self._episodes: dict[str, _Episode] = {}
        self._lock = threading.Lock()
        self.engine_failure: EngineError | None = None
        """The first engine error a call met (the caller raises it: the engines failed for good)."""
        self._server, self._thread = None, None

    def start(self) -> str:
        """Serve on a free port (connections queue from now on) and return the server's base URL."""
        if self.base_url is not None:
            raise RuntimeError(f"the chat endpoint already serves on {self.base_url}")
        sock = listening_socket(self.host, 0)
        self._server = uvicorn_server(self._app())
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="megarl-chat-endpoint", daemon=True)
        self._thread.start()
        self.base_url = f"http://{self.host}:{sock.getsockname()[1]}"
        return self.base_url

    def open_episode(self, episode_id: str, route: int, seed: int | None, sampling: SamplingParams | None = None) -> str:
        """Open an episode and return its base URL (``.../episodes/{episode_id}/v1``), which an
        OpenAI client takes as ``base_url``.

        Args:
            episode_id: unique among the open episodes (any text: it is quoted in the URL).
            route: the engine of every turn (:meth:`~megarl.rollout.EngineGroup.generate_turn`).
            seed: the episode's seed (see the module docstring); None: unseeded.
            sampling: how its turns are sampled, and the ``temperature`` and ``top_p`` its calls
                may send; None: the endpoint's.
        """
        if self.base_url is None:
            raise RuntimeError("the chat endpoint is not serving: call start() before open_episode()")
        with self._lock:
            if episode_id in self._episodes:
                raise ValueError(f"episode {episode_id!r} is already open: episode ids must be unique among the open episodes")
            self._episodes[episode_id] = _Episode(route=route, seed=seed, sampling=sampling or self.sampling)
        return f"{self.base_url}/episodes/{quote(episode_id, safe='')}/v1"

    def trajectory(self, episode_id: str) -> Trajectory:
        """Close the episode and return what its calls recorded; a call still generating is
        dropped (answered 404). Raises ``ValueError`` for an episode not open or without a call."""
        with self._lock:
            episode = self._episodes.pop(episode_id, None)
        if episode is None:
            raise ValueError(f"episode {episode_id!r} is not open (open it with open_episode; trajectory() closes it)")
        if episode.trajectory is None:
            raise ValueError(f"episode {episode_id!r} made no answered call: its agent never asked the model for a turn")
        return episode.trajectory

    def close(self) -> None:
        """Stop serving (calls in flight get ~1 s) and forget every episode. Idempotent."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server, self.base_url = None, None
        with self._lock:
            self._episodes.clear()

    def __enter__(self) -> ChatEndpoint:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        async def chat_completions(episode_id: str, request: HTTPRequest) -> JSONResponse:
            try:
                try:
                    body = json.loads(await request.body())
                except json.JSONDecodeError as error:
                    raise RequestError(f"the request body is not JSON: {error}") from None
                return JSONResponse(await self._complete(episode_id, body))
            except RequestError as error:
                return JSONResponse(error.body(), status_code=error.status)

        app.add_api_route("/episodes/{episode_id:path}/v1/chat/completions", chat_completions, methods=["POST"])
        return app

    async def _complete(self, episode_id: str, body: Any) -> dict:
        """Check the call, generate its turn on the engines' loop, record it and answer it."""
        with self._lock:
            episode = self._episodes.get(episode_id)
            if episode is None:
                raise RequestError(f"episode {episode_id!r} is not open (or is closed): megarl opens each episode before its agent calls", status=HTTPStatus.NOT_FOUND)
            request = read_request(body, episode.sampling, self.tools)
            if episode.busy:
                raise RequestError(f"episode {episode_id!r} is generating a turn: its calls must come one after another (an episode is one conversation)", status=HTTPStatus.CONFLICT)
            turn = self._plan(episode, request)
            episode.busy = True
        try:
            coroutine = self.engines.generate_turn(turn.input_ids, episode.sampling, max_new_tokens=turn.max_new_tokens, seed=turn.seed, route=episode.route)
            try:
                sample = await asyncio.wrap_future(self.engines.run(coroutine))
            except Exception as error:
                if isinstance(error, EngineError):
                    # The engine group restarts and resends on its own: an error that reaches here
                    # is the run's, as in the built-in loop; play_programs raises it after the round.
                    self.engine_failure = self.engine_failure or error
                raise RequestError(f"the engine failed: {type(error).__name__}: {error}", status=HTTPStatus.INTERNAL_SERVER_ERROR) from None
            text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            message = assistant_message(text, self.parser.parse(text, request.tools), 0 if episode.trajectory is None else episode.trajectory.turns)
            with self._lock:
                if self._episodes.get(episode_id) is not episode:
                    raise RequestError(f"episode {episode_id!r} was closed while its turn generated", status=HTTPStatus.NOT_FOUND)
                self._record(episode, turn, sample, text, message)
        finally:
            episode.busy = False
        return chat_completion(request, message, sample, prompt_tokens=len(turn.input_ids), tokenizer=self.tokenizer)

    def _plan(self, episode: _Episode, request: ChatRequest) -> _Turn:
        """The turn a call asks for, within the episode's conversation and limits; raises
        ``RequestError`` for a call that does not continue the conversation or exceeds the limits."""
        trajectory, limits, tools = episode.trajectory, self.limits, request.declarations or None
        if trajectory is None:
            prompt, recorded, observation = _rendered(prompt_ids, self.tokenizer, request.messages, tools), [], []
        else:
            if request.declarations != episode.declarations:
                raise RequestError("tools differ from the episode's first call, whose prompt rendered them: send the same tools on every call", param="tools")
            added = added_messages(request.messages, episode.conversation)
            if trajectory.turns >= limits.max_turns:
                trajectory.max_turns_reached = True
                raise RequestError(f"max turns: the episode took its {limits.max_turns} model turns (agent.max_turns); the agent must end it")
            prompt, recorded = trajectory.prompt_ids, trajectory.response_ids
            observation = after_turn(self.tokenizer, episode.last_finish_reason, _rendered(observation_ids, self.tokenizer, added, tools=tools))
        room = limits.max_response_tokens - len(recorded) - len(observation)
        if room < 1:
            if trajectory is not None:
                trajectory.finish_reason = "length"
            raise RequestError(f"token budget spent: the episode's {limits.max_response_tokens} tokens after the prompt leave no room for another turn; the agent must end it")
        max_new_tokens = min(room, limits.max_tokens_per_turn or room, request.max_tokens or room)
        seed = None if episode.seed is None else resume_seed(episode.seed, len(recorded) + len(observation))
        return _Turn(request, prompt, observation, [*prompt, *recorded, *observation], max_new_tokens, room, seed)

    def _record(self, episode: _Episode, turn: _Turn, sample: Sample, text: str, message: dict) -> None:
        """Append the observation and the sampled turn to the episode's trajectory."""
        if episode.trajectory is None:
            episode.trajectory, episode.declarations = Trajectory(prompt_ids=list(turn.prompt)), turn.request.declarations
        trajectory = episode.trajectory
        trajectory.add_observation(turn.observation)
        trajectory.add_model_turn(sample)
        trajectory.final_text = text
        if sample.finish_reason == "length" and turn.max_new_tokens == turn.room:
            trajectory.finish_reason = "length"
        episode.conversation = [*turn.request.messages, chat_message(message, len(turn.request.messages))]
        episode.last_finish_reason = sample.finish_reason


def _rendered(render, *args, **kwargs) -> list[int]:
    """``render(*args, **kwargs)`` (``prompt_ids`` or ``observation_ids``), a template's refusal a ``RequestError``."""
    try:
        return render(*args, **kwargs)
    except ChatTemplateError as error:
        raise RequestError(f"the messages cannot be rendered token-exactly: {error}", param="messages") from None
