"""The part of OpenAI's chat-completions protocol that :mod:`megarl.agents.openai_server` serves:
requests checked and read, messages as the chat template takes them and as calls compare them, tool
declarations as :class:`~megarl.agents.tools.Tool` objects for the parsers, and the
``chat.completion`` answer. No state: the endpoint keeps the episodes.

The request fields served:

- ``messages``: roles ``system``, ``user``, ``assistant`` (``tool_calls`` with ``arguments`` as a
  JSON string or object; ``content`` may be null), ``tool`` (``tool_call_id`` and ``name`` kept for
  the template); every ``content`` a string (content parts are refused).
- ``tools``: OpenAI function declarations within megarl's tool schema subset
  (:mod:`megarl.agents.tools`: the parsers read calls against them); omitted: the episode's tools.
- ``max_tokens`` / ``max_completion_tokens``: the turn's limit, within the episode's limits.
- ``temperature``, ``top_p``: left out or the run's: the trainer needs the log-probs of the run's
  sampling. ``n`` 1, ``stream`` false, ``top_logprobs`` 0, ``tool_choice`` ``auto``, ``stop``
  none (:data:`FIXED_FIELDS`); ``logprobs`` true lists every sampled token's log-prob, the
  end-of-turn token included (it is trained).
- ``model`` is echoed; other fields (``seed``, ``user``, ...) are ignored: the run's seeds decide.

The answer's ``choices[0].message`` holds the turn's text outside the tool-call markup (null when
empty and there are calls) and its calls as ``tool_calls`` (ids ``call_<turn>_<index>``,
``arguments`` a JSON string). A turn in which the parser finds a malformed call is answered as
text, whole, without calls, so that the agent sees what the model wrote. ``finish_reason`` is
``tool_calls``, ``length`` (a token limit cut the turn) or ``stop``. A refusal is a
:class:`RequestError`, sent as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from http import HTTPStatus
from typing import Any

from megarl.agents.parsers import ParsedTurn
from megarl.agents.tools import Tool, json_type_of
from megarl.rollout.sampling import Sample, SamplingParams

ROLES = ("system", "user", "assistant", "tool")

FIXED_FIELDS: dict[str, tuple[Any, str]] = {
    "n": (1, "an episode is one conversation: one choice per call"),
    "stream": (False, "answers are sent whole"),
    "top_logprobs": (0, "only the sampled tokens' log-probs are recorded"),
    "tool_choice": ("auto", "the model's turn is sampled as it comes: a choice cannot be forced on it"),
    "stop": (None, "the run's sampling decides where a turn ends"),
}
"""Request fields that take one value here (or are left out), and why."""


class RequestError(ValueError):
    """A request the endpoint refuses: the message, the HTTP status and the request field to name."""

    def __init__(self, message: str, *, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict:
        """The OpenAI error object."""
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """A checked request."""

    messages: list[dict]
    """Every message as :func:`chat_message` reads it."""
    declarations: list[dict]
    """The tool declarations, as sent (or the episode's): what the chat template renders."""
    tools: dict[str, Tool]
    """The same tools by name, for the parser."""
    max_tokens: int | None
    """The turn's limit the agent asked for, or None."""
    logprobs: bool
    model: str


def read_request(body: Any, sampling: SamplingParams, default_tools: list[dict]) -> ChatRequest:
    """``body`` checked against the fields served (see the module docstring) and the run's sampling.

    Raises:
        RequestError: naming the field that is not served, or not as served, and what to send.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type_of(body)}")
    for field, (value, reason) in FIXED_FIELDS.items():
        if body.get(field) not in (None, value) and not (field == "stop" and body[field] == []):
            raise RequestError(f"{field} {json.dumps(body[field])} is not served: leave it out or send {json.dumps(value)} ({reason})", param=field)
    for field in ("temperature", "top_p"):
        given, run = body.get(field), getattr(sampling, field)
        if given is not None and (not isinstance(given, (int, float)) or not math.isclose(given, run, rel_tol=1e-9)):
            raise RequestError(f"{field} {given!r} differs from the run's sampling ({run}): training needs the log-probs of the run's sampling; leave it out or send {run}", param=field)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of chat messages", param="messages")
    declarations = default_tools if body.get("tools") is None else body["tools"]
    return ChatRequest(
        messages=[chat_message(message, index) for index, message in enumerate(messages)], declarations=declarations,
        tools=declared_tools(declarations, "tools"), max_tokens=_requested_tokens(body), logprobs=bool(body.get("logprobs")),
        model=str(body.get("model") or "megarl"),
    )


def chat_message(raw: Any, index: int) -> dict:
    """A message as the chat template takes it and as conversations are compared: ``role``,
    ``content`` (a string: an assistant's null is ``""``), an assistant's ``tool_calls`` with
    ``arguments`` as an object, a tool result's ``tool_call_id`` and ``name``."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise RequestError(f"{where} must be an object with a role among {', '.join(ROLES)}, got {raw!r:.80}", param=where)
    role, content = raw["role"], raw.get("content")
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string, got {json_type_of(content)} (content parts are not served: send the text)", param=f"{where}.content")
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and raw.get("tool_calls"):
        if not isinstance(raw["tool_calls"], list):
            raise RequestError(f"{where}.tool_calls must be a list, got {json_type_of(raw['tool_calls'])}", param=f"{where}.tool_calls")
        message["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{number}]") for number, call in enumerate(raw["tool_calls"])]
    if role == "tool":
        message.update({key: raw[key] for key in ("tool_call_id", "name") if isinstance(raw.get(key), str)})
    return message


def _tool_call(raw: Any, where: str) -> dict:
    """One call of an assistant message, its ``arguments`` decoded when they are a JSON string."""
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}, got {raw!r:.80}', param=where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise RequestError(f"{where}.function.arguments is a string but not JSON ({error.msg})", param=f"{where}.function.arguments") from None
    return {"id": raw.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _compared(message: dict) -> tuple:
    """What two messages share when they are the same turn of a conversation: role, content, and
    each call's name and arguments (their JSON spelling and the call ids aside)."""
    calls = tuple((call["function"]["name"], json.dumps(call["function"]["arguments"], sort_keys=True)) for call in message.get("tool_calls", ()))
    return message["role"], message["content"], calls


def added_messages(messages: list[dict], conversation: list[dict]) -> list[dict]:
    """The tool and user messages that ``messages`` add after ``conversation``, which they must
    repeat. Raises ``RequestError`` naming the first message that differs from the conversation,
    or one of another role after it, or none added."""
    for index, expected in enumerate(conversation):
        if index == len(messages) or _compared(messages[index]) != _compared(expected):
            found = "is missing" if index == len(messages) else f"(role {messages[index]['role']!r}) differs from it"
            raise RequestError(
                f"messages[{index}] {found}: the conversation so far has there {json.dumps(expected, ensure_ascii=False)[:200]}. "
                f"Send the history back unchanged, the assistant messages as this endpoint answered them: an agent that rewrites "
                f"or drops earlier messages cannot be trained token-exactly (the trajectory holds the ids that were sampled)",
                param=f"messages[{index}]",
            )
    added = messages[len(conversation) :]
    if not added:
        raise RequestError(f"messages add nothing after the conversation so far ({len(conversation)} messages): send the tool results or a user message", param="messages")
    for index, message in enumerate(added, len(conversation)):
        if message["role"] not in ("tool", "user"):
            raise RequestError(
                f"messages[{index}] has role {message['role']!r}: after the conversation so far an agent adds only tool and user messages "
                f"(an assistant message the model did not sample, or a new system message, would rewrite the conversation)",
                param=f"messages[{index}]",
            )
    return added


def declared_tools(declarations: Any, where: str) -> dict[str, Tool]:
    """Function declarations as :class:`Tool` objects by name, what the parsers read (names and
    parameter types), through the same checks as megarl's own tools. They are never run: the
    agent runs the tools it declares. Raises ``RequestError`` (a ``ValueError``) naming the
    declaration and its problem."""
    if not isinstance(declarations, list):
        raise RequestError(f"{where} must be a list of function declarations, got {json_type_of(declarations)}", param="tools")
    tools: dict[str, Tool] = {}
    for index, declaration in enumerate(declarations):
        function = declaration.get("function") if isinstance(declaration, dict) and declaration.get("type") == "function" else None
        if not isinstance(function, dict):
            raise RequestError(f'{where}[{index}] must be {{"type": "function", "function": {{"name", "description", "parameters"}}}}, got {declaration!r:.80}', param=f"tools[{index}]")
        try:
            tool = Tool(function.get("name"), function.get("description", ""), function.get("parameters", {"type": "object", "properties": {}}), _run_by_the_agent)
        except ValueError as error:
            raise RequestError(f"{where}[{index}]: {error} (megarl reads tool calls against its tool schema subset, megarl/agents/tools.py)", param=f"tools[{index}]") from None
        if tool.name in tools:
            raise RequestError(f"{where}[{index}]: a second tool named {tool.name!r}: tool names must be unique", param=f"tools[{index}]")
        tools[tool.name] = tool
    return tools


def _run_by_the_agent(**arguments: Any) -> None:
    raise RuntimeError("the agent program runs the tools it declares: the chat endpoint only reads their calls")


def _requested_tokens(body: dict) -> int | None:
    """The request's turn limit (``max_completion_tokens``, else ``max_tokens``), or None."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RequestError(f"{field} must be a positive integer, got {value!r}", param=field)
            return value
    return None


def assistant_message(text: str, parsed: ParsedTurn, turn_index: int) -> dict:
    """The assistant message that answers a sampled turn (``text``, as ``parsed``): the text outside
    the tool-call markup and the calls; the whole text and no calls when a call is malformed."""
    if parsed.errors:
        return {"role": "assistant", "content": text}
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if parsed.calls else "")}
    if parsed.calls:
        message["tool_calls"] = [
            {"id": f"call_{turn_index}_{index}", "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
            for index, call in enumerate(parsed.calls)
        ]
    return message


def chat_completion(request: ChatRequest, message: dict, sample: Sample, *, prompt_tokens: int, tokenizer: Any) -> dict:
    """The ``chat.completion`` object answering ``request`` with ``message``, the turn ``sample``
    continuing ``prompt_tokens`` ids."""
    finish_reason = "tool_calls" if message.get("tool_calls") else "length" if sample.finish_reason == "length" else "stop"
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    if request.logprobs:
        tokens = tokenizer.batch_decode([[token_id] for token_id in sample.response_ids])
        choice["logprobs"] = {
            "content": [
                {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}
                for token, logprob in zip(tokens, sample.logprobs)
            ]
        }
    completion_tokens = len(sample.response_ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": request.model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }
