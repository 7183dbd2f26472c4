"""Token ids from the tokenizer's chat template for the parts of an episode that megarl writes: the
first prompt and the observations between model turns. The model's own turns are never rendered
or re-tokenised; they stay the ids the engine sampled.

An episode's ids are ``prompt_ids(...)``, then the engine's ids of turn 1 (ending with the
end-of-turn token the engine stopped at), then ``observation_ids(...)`` of the environment's
answer, then the engine's ids of turn 2, and so on: the same ids as rendering the whole
conversation with the template and tokenising it, at every boundary, whatever the model wrote.

The tokenizer is a transformers tokenizer with a chat template; its ``eos_token`` is the
end-of-turn token the engine stops at (``<|im_end|>`` for Qwen's instruct models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

OBSERVATION_ROLES = ("tool", "user")
"""The roles of the messages an environment answers with."""

REFERENCE_PROMPT = "megarl reference prompt"
REFERENCE_TURN = "megarl-reference-assistant-turn"
"""The content of the stand-in assistant turn ``observation_ids`` renders before the observations,
found again in the rendered text to locate the end of that turn."""


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render an episode's turns as ids that join up."""


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict] | None = None) -> list[int]:
    """The ids of an episode's first prompt: ``messages`` rendered by the chat template with the
    tool declarations (``ToolSet.schemas()``) and the generation prompt of the first assistant
    turn, tokenised without added special tokens (the template writes its own), as the dataset
    loader tokenises single-turn prompts (``megarl/data/datasets.py``). A template that does not
    render ``tools`` (the bundled one) leaves them out of the prompt.

    Raises:
        ChatTemplateError: ``messages`` are not ``{"role": str, "content": str}`` dicts, or the
            tokenizer has no chat template.
    """
    _check_messages(messages, ("system", "user", "assistant", "tool"), "prompt")
    text = _render(tokenizer, messages, tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def observation_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[dict] | None = None) -> list[int]:
    """The ids that follow a model turn ending with the tokenizer's end-of-turn token (its
    ``eos_token``), for observation ``messages`` (roles ``tool`` or ``user``): whatever the
    template writes after that token (Qwen's newline), the observations as the template renders
    them after an assistant turn (Qwen3 groups consecutive tool results into one user turn), and
    the generation prompt of the next assistant turn.

    Taken from the template, not from a hand-written format: a stand-in conversation (a user
    message, an assistant turn with fixed content and, before tool results, one tool call per
    result) is rendered with ``messages`` after it and the generation prompt; the text after the
    end-of-turn token that closes the stand-in assistant turn is the observation. It is tokenised
    after that token, so it splits as it does inside the whole conversation. The stand-in turn is
    found by its content rather than by rendering the conversation without ``messages``, because
    templates may render the last assistant turn differently (Qwen3 adds an empty ``<think>``
    block to it).

    Raises:
        ChatTemplateError: ``messages`` are empty, not ``{"role": str, "content": str}`` dicts or
            not of an observation role; the tokenizer has no chat template or no ``eos_token``;
            the template does not end the assistant turn with the end-of-turn token, or does not
            render the observations after it.
    """
    _check_messages(messages, OBSERVATION_ROLES, "observation")
    name, end_of_turn = _name(tokenizer), tokenizer.eos_token
    if not end_of_turn:
        raise ChatTemplateError(
            f"tokenizer {name!r} has no eos_token: observations follow the end-of-turn token the engine stops at; "
            f"set the tokenizer's eos_token to the chat template's end-of-turn token"
        )
    text = _render(tokenizer, [*_reference_conversation(messages), *messages], tools)
    turn_at = text.find(REFERENCE_TURN)
    if turn_at == -1 or text.find(REFERENCE_TURN, turn_at + 1) != -1:
        raise ChatTemplateError(
            f"the chat template of {name!r} does not render an assistant message's content once and as is "
            f"(content {REFERENCE_TURN!r}, rendered: {text!r:.300})"
        )
    end = text.find(end_of_turn, turn_at)
    if end == -1:
        raise ChatTemplateError(
            f"the chat template of {name!r} does not end an assistant message with the end-of-turn token "
            f"{end_of_turn!r} (the tokenizer's eos_token) that the engine stops at: set eos_token to the token "
            f"the template closes assistant turns with (rendered: {text[turn_at:]!r:.300})"
        )
    observation = text[end + len(end_of_turn) :]
    for index, message in enumerate(messages):
        if message["content"].strip() not in observation:
            raise ChatTemplateError(
                f"the chat template of {name!r} does not render observation message {index} (role {message['role']!r}) "
                f"after the assistant turn (rendered after it: {observation!r:.300}): use a template that renders "
                f"{message['role']!r} messages"
            )
    ids = list(tokenizer(end_of_turn + observation, add_special_tokens=False)["input_ids"])
    if ids[:1] != [tokenizer.eos_token_id]:
        raise ChatTemplateError(f"tokenizer {name!r} does not encode its eos_token {end_of_turn!r} as one token (id {tokenizer.eos_token_id})")
    return ids[1:]


def _reference_conversation(observations: Sequence[Mapping[str, Any]]) -> list[dict]:
    """A user message and an assistant turn of fixed content to render observations after; before
    tool results the turn carries one tool call per result (templates may insist on it), with
    the result's ``tool_call_id`` and ``name`` when it has them."""
    tool_results = [message for message in observations if message["role"] == "tool"]
    turn: dict[str, Any] = {"role": "assistant", "content": REFERENCE_TURN}
    if tool_results:
        turn["tool_calls"] = [
            {
                "id": message.get("tool_call_id", f"call{index}"),
                "type": "function",
                "function": {"name": message.get("name", "reference_tool"), "arguments": {}},
            }
            for index, message in enumerate(tool_results)
        ]
    return [{"role": "user", "content": REFERENCE_PROMPT}, turn]


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict] | None) -> str:
    """``messages`` as the chat template writes them, with the generation prompt, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {_name(tokenizer)!r} has no chat template: episodes are rendered with it; "
            f"use a tokenizer that has one"
        )
    return tokenizer.apply_chat_template(
        [dict(message) for message in messages], tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
    )


def _name(tokenizer: Any) -> str:
    """The tokenizer's path or Hub name, for messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _check_messages(messages: Sequence[Mapping[str, Any]], roles: Sequence[str], what: str) -> None:
    """Raises ``ChatTemplateError`` unless ``messages`` is a non-empty sequence of mappings with a
    ``role`` among ``roles`` and a string ``content``."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError(f"{what} messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"{what} message {index} must be a dict with a string 'content', got {message!r:.80}")
        if message.get("role") not in roles:
            raise ChatTemplateError(f"{what} message {index} has role {message.get('role')!r}: {what} messages have role {' or '.join(roles)}")
