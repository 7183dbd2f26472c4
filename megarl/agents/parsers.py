"""Tool-call parsers: the text of a model turn -> its content and the tool calls it makes.

A parser is an object with a ``name`` and ``parse(text, tools) -> ParsedTurn``; ``TOOL_PARSERS``
holds them by name, the value of ``agent.tool_parser`` (verl's ``multi_turn.format``). A parser
reads text only: the trajectory keeps the engine's token ids, and the text is only looked at.

What the parsers are given: the model turn decoded with ``skip_special_tokens=True``, so that the
end-of-turn token (``<|im_end|>``, ``<|endoftext|>``) and ``<|unk|>`` are not part of it. Qwen's
tokenizers mark ``<tool_call>`` and ``</tool_call>`` as added tokens that are *not* special, so
they survive that decoding; a tokenizer that marks them special must be decoded with
``skip_special_tokens=False`` and the end-of-turn token cut off instead.

Built in:

- ``hermes``: what Qwen2.5 and Qwen3 emit with their chat templates, zero or more blocks
  ``<tool_call>\\n{"name": "lookup", "arguments": {"key": "47"}}\\n</tool_call>``; ``arguments``
  may also be a JSON string holding an object, or absent for a tool without parameters.
- ``compact``: for the bundled word-level tokenizer (words between single spaces, every digit its
  own word), ``lookup 4 7`` -> ``lookup(key="4 7")``. See ``CompactParser``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Protocol

from megarl.agents.tools import JSON_TYPES, Tool, json_type_of
from megarl.config.base import did_you_mean


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A well-formed call of a known tool; its arguments are not checked against the tool's schema
    here (``Tool.invoke`` does that)."""

    name: str
    arguments: dict


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """A model turn read by a parser.

    Attributes:
        content: the turn's text outside the tool-call markup, stripped of surrounding whitespace.
        calls: the well-formed calls of known tools, in the order the model wrote them.
        errors: one short message, written for the model, per malformed call (not in ``calls``).
    """

    content: str
    calls: list[ToolCall]
    errors: list[str]


class ToolParser(Protocol):
    """Reads the tool calls of one model turn (the text decoded as the module docstring says);
    ``tools`` are the episode's tools by name. Never raises for what the model wrote: a malformed
    call is an entry of ``ParsedTurn.errors``."""

    name: str

    def parse(self, text: str, tools: Mapping[str, Tool]) -> ParsedTurn: ...


class HermesParser:
    """``<tool_call>{json}</tool_call>`` blocks (Hermes / Qwen). A block is malformed when its JSON
    is invalid or not an object, its ``"name"`` is missing or not a known tool, its ``"arguments"``
    is not an object (or a JSON string of one), or it is not closed; a ``</tool_call>`` without a
    ``<tool_call>`` is an error too. The text outside blocks is the content; the text inside a
    malformed block is not."""

    name = "hermes"
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def parse(self, text: str, tools: Mapping[str, Tool]) -> ParsedTurn:
        outside, calls, errors = [], [], []
        position, number = 0, 0
        while True:
            start, stray = text.find(self.OPEN, position), text.find(self.CLOSE, position)
            if stray != -1 and (start == -1 or stray < start):
                errors.append(f"{self.CLOSE} without a {self.OPEN} before it")
                outside.append(text[position:stray])
                position = stray + len(self.CLOSE)
                continue
            if start == -1:
                outside.append(text[position:])
                break
            outside.append(text[position:start])
            number += 1
            end = text.find(self.CLOSE, start + len(self.OPEN))
            if end == -1:
                errors.append(f"tool call {number}: {self.OPEN} is not closed by {self.CLOSE}")
                break
            call = _hermes_call(text[start + len(self.OPEN) : end], tools)
            if isinstance(call, ToolCall):
                calls.append(call)
            else:
                errors.append(f"tool call {number}: {call}")
            position = end + len(self.CLOSE)
        return ParsedTurn(content="".join(outside).strip(), calls=calls, errors=errors)


def _hermes_call(body: str, tools: Mapping[str, Tool]) -> ToolCall | str:
    """The call one block's JSON makes, or what is wrong with it."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        return f"invalid JSON ({error.msg} at character {error.pos})"
    if not isinstance(payload, dict):
        return f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, got {json_type_of(payload)}'
    name = payload.get("name")
    if not isinstance(name, str):
        return 'missing "name" (a string)'
    if name not in tools:
        return f"unknown tool {name!r} (tools: {', '.join(tools) or 'none'})"
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return f'{name}: "arguments" is a string but not JSON ({error.msg})'
    if not isinstance(arguments, dict):
        return f'{name}: "arguments" must be an object, got {json_type_of(arguments)}'
    return ToolCall(name=name, arguments=arguments)


class CompactParser:
    """Calls written as words, for the bundled word-level tokenizer.

    The text is split at whitespace. A word that is a tool's name starts a call of that tool; the
    words after it, up to the next tool name or the end of the text, are its arguments, one word
    per parameter in the order of the schema's ``properties``:

    - a ``string`` parameter takes the word as is; when it is the *last* parameter it takes all the
      remaining words joined by single spaces, so that ``lookup 4 7`` (the bundled tokenizer
      writes every digit as its own word) is ``lookup(key="4 7")``;
    - any other parameter takes the word read as a JSON literal (``4``, ``2.5``, ``true``), which
      must be of the parameter's type: ``max`` for an integer is an error;
    - words beyond the parameters are ignored (a tool without parameters ignores every word after
      it: ``lookup 3 max`` with a parameterless ``lookup`` and no tool ``max`` is ``lookup()``);
    - a required parameter left without a word is an error; an optional one is left out.

    The words before the first tool name are the content, joined by single spaces; words after a
    call are never content. A tool name cannot be an argument (it would start a new call), and an
    integer of several digits cannot be one word with the bundled tokenizer: declare such a value
    as a final string parameter.
    """

    name = "compact"

    def parse(self, text: str, tools: Mapping[str, Tool]) -> ParsedTurn:
        words = text.split()
        starts = [index for index, word in enumerate(words) if word in tools]
        calls, errors = [], []
        for number, (start, end) in enumerate(zip(starts, [*starts[1:], len(words)]), 1):
            call = _compact_call(tools[words[start]], words[start + 1 : end])
            if isinstance(call, ToolCall):
                calls.append(call)
            else:
                errors.append(f"tool call {number}: {call}")
        content = " ".join(words[: starts[0]] if starts else words)
        return ParsedTurn(content=content, calls=calls, errors=errors)


def _compact_call(tool: Tool, words: list[str]) -> ToolCall | str:
    """The call ``tool``'s argument words make, or what is wrong with them."""
    names = list(tool.properties)
    arguments = {}
    for index, (name, word) in enumerate(zip(names, words)):
        json_type = tool.properties[name]["type"]
        if json_type == "string":
            arguments[name] = " ".join(words[index:]) if index == len(names) - 1 else word
            continue
        try:
            value = json.loads(word, parse_constant=_refuse_constant)
        except ValueError:
            value = word
        if not JSON_TYPES[json_type](value):
            return f"{tool.name}: argument {name!r} must be of type {json_type}, got {word!r}"
        arguments[name] = value
    missing = [name for name in tool.required if name not in arguments]
    if missing:
        return f"{tool.name}: missing argument {missing[0]!r}"
    return ToolCall(name=tool.name, arguments=arguments)


def _refuse_constant(word: str) -> None:
    """``json.loads`` reads ``NaN`` and ``Infinity`` as numbers; as a model's word they are not."""
    raise ValueError(f"{word} is not a JSON number")


TOOL_PARSERS: dict[str, ToolParser] = {parser.name: parser for parser in (HermesParser(), CompactParser())}
"""The parsers by name (``agent.tool_parser``). A new format is an object with ``name`` and
``parse(text, tools)`` added here."""


def tool_parser(name: str) -> ToolParser:
    """The parser named ``name``. Raises ``ValueError`` naming the known ones for any other name."""
    if name not in TOOL_PARSERS:
        raise ValueError(
            f"agent.tool_parser {name!r} is not a known tool-call parser{did_you_mean(name, list(TOOL_PARSERS))}: "
            f"known are {', '.join(sorted(TOOL_PARSERS))} (a new one is added to TOOL_PARSERS in megarl/agents/parsers.py)"
        )
    return TOOL_PARSERS[name]
