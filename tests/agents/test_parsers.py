"""Tool-call parsers: Hermes blocks as Qwen emits them, the compact word format of the bundled
tokenizer (on text it decodes), their malformed calls, and the registry."""

from __future__ import annotations

import pytest

from megarl.agents.parsers import TOOL_PARSERS, CompactParser, HermesParser, ParsedTurn, ToolCall, tool_parser
from megarl.agents.tools import Tool, ToolSet

pytestmark = pytest.mark.cpu


def declared(name: str, properties: dict, required: list[str], function) -> Tool:
    return Tool(name, f"The {name} tool.", {"type": "object", "properties": properties, "required": required}, function)


TOOLS = ToolSet(
    [
        declared("lookup", {"key": {"type": "string"}}, ["key"], lambda key: {"47": 1234}[key]),
        declared("add", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"], lambda a, b: a + b),
        declared("clock", {}, [], lambda: "noon"),
        declared("scale", {"x": {"type": "number"}, "flag": {"type": "boolean"}}, ["x"], lambda x, flag=False: x),
        declared("pair", {"label": {"type": "string"}, "count": {"type": "integer"}}, ["label"], lambda label, count=1: label * count),
    ]
)

hermes = HermesParser()
compact = CompactParser()


def block(json_text: str) -> str:
    return f"<tool_call>\n{json_text}\n</tool_call>"


def test_hermes_call_as_qwen_writes_it():
    text = 'I will look it up.\n' + block('{"name": "lookup", "arguments": {"key": "47"}}')
    assert hermes.parse(text, TOOLS) == ParsedTurn("I will look it up.", [ToolCall("lookup", {"key": "47"})], [])


def test_hermes_several_calls_with_varying_whitespace_and_text_between():
    text = (
        'First <tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call> then\n'
        '<tool_call>\n\n   {"name": "clock"}   \n</tool_call>\n'
        + block('{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}')
    )
    parsed = hermes.parse(text, TOOLS)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("clock", {}), ToolCall("add", {"a": 3, "b": 4})]
    assert parsed.content == "First  then" and parsed.errors == []


def test_hermes_text_without_calls_is_all_content():
    assert hermes.parse("  The answer is 7.\n", TOOLS) == ParsedTurn("The answer is 7.", [], [])


@pytest.mark.parametrize(
    "body, error",
    [
        ('{"name": "lookup", "arguments": {"key": "47"}', "invalid JSON (Expecting ',' delimiter at character "),
        ('["lookup"]', 'expected a JSON object {"name": ..., "arguments": {...}}, got array'),
        ('{"arguments": {"key": "47"}}', 'missing "name" (a string)'),
        ('{"name": "search", "arguments": {}}', "unknown tool 'search' (tools: lookup, add, clock, scale, pair)"),
        ('{"name": "lookup", "arguments": ["47"]}', 'lookup: "arguments" must be an object, got array'),
        ('{"name": "lookup", "arguments": "key=47"}', 'lookup: "arguments" is a string but not JSON (Expecting value)'),
        ('{"name": "lookup", "arguments": "[1]"}', 'lookup: "arguments" must be an object, got array'),
    ],
)
def test_hermes_malformed_call_is_an_error_and_the_others_still_count(body, error):
    text = "Checking. " + block(body) + block('{"name": "clock", "arguments": {}}')
    parsed = hermes.parse(text, TOOLS)
    assert parsed.calls == [ToolCall("clock", {})] and parsed.content == "Checking."
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith(f"tool call 1: {error}")


def test_hermes_unclosed_and_stray_tags():
    unclosed = hermes.parse(block('{"name": "clock"}') + ' and <tool_call>\n{"name": "lookup", "arguments": {"key"', TOOLS)
    assert unclosed == ParsedTurn("and", [ToolCall("clock", {})], ["tool call 2: <tool_call> is not closed by </tool_call>"])
    stray = hermes.parse('done</tool_call> ok', TOOLS)
    assert stray == ParsedTurn("done ok", [], ["</tool_call> without a <tool_call> before it"])


def test_compact_last_string_parameter_takes_the_remaining_words():
    assert compact.parse("lookup 4 7", TOOLS) == ParsedTurn("", [ToolCall("lookup", {"key": "4 7"})], [])
    assert compact.parse("pair x 3 9", TOOLS).calls == [ToolCall("pair", {"label": "x", "count": 3})]


def test_compact_words_before_the_first_tool_are_content_and_calls_follow_each_other():
    parsed = compact.parse("the sum is add 3 4 5 add 1 2 scale 2.5 true clock 3 max", TOOLS)
    assert parsed.content == "the sum is" and parsed.errors == []
    assert parsed.calls == [
        ToolCall("add", {"a": 3, "b": 4}),
        ToolCall("add", {"a": 1, "b": 2}),
        ToolCall("scale", {"x": 2.5, "flag": True}),
        ToolCall("clock", {}),
    ]


def test_compact_optional_parameters_may_be_left_out():
    assert compact.parse("scale 2", TOOLS).calls == [ToolCall("scale", {"x": 2})]
    assert compact.parse("answer 7", TOOLS) == ParsedTurn("answer 7", [], [])


@pytest.mark.parametrize(
    "text, error",
    [
        ("add 3", "tool call 1: add: missing argument 'b'"),
        ("lookup", "tool call 1: lookup: missing argument 'key'"),
        ("add 3 max", "tool call 1: add: argument 'b' must be of type integer, got 'max'"),
        ("add 3 2.5", "tool call 1: add: argument 'b' must be of type integer, got '2.5'"),
        ("scale NaN", "tool call 1: scale: argument 'x' must be of type number, got 'NaN'"),
        ("scale 1 yes", "tool call 1: scale: argument 'flag' must be of type boolean, got 'yes'"),
    ],
)
def test_compact_malformed_calls(text, error):
    parsed = compact.parse(text + " clock", TOOLS)
    assert parsed.errors == [error] and parsed.calls == [ToolCall("clock", {})]


def test_compact_on_text_the_bundled_tokenizer_decodes():
    from transformers import AutoTokenizer

    from megarl.config import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("bundled:tiny-moe"), local_files_only=True)
    biggest = declared("max", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"], lambda a, b: max(a, b))
    tools = ToolSet([biggest])
    sampled = tokenizer("what is max 4 7<|im_end|>", add_special_tokens=False)["input_ids"]
    assert sampled[-1] == tokenizer.eos_token_id
    parsed = compact.parse(tokenizer.decode(sampled, skip_special_tokens=True), tools)
    assert parsed == ParsedTurn("what is", [ToolCall("max", {"a": 4, "b": 7})], [])
    assert tools["max"].invoke(parsed.calls[0].arguments) == "7"


def test_registry():
    assert tool_parser("hermes") is TOOL_PARSERS["hermes"] and tool_parser("compact").name == "compact"
    with pytest.raises(ValueError) as raised:
        tool_parser("hermse")
    assert "agent.tool_parser 'hermse' is not a known tool-call parser — did you mean `hermes`?" in str(raised.value)
    assert "known are compact, hermes" in str(raised.value)
