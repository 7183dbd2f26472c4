"""Tools: declarations checked when made, the OpenAI declaration, and invoke's argument checks,
error messages for the model and results as text."""

from __future__ import annotations

import json
import re

import pytest

from megarl.agents.tools import Tool, ToolError, ToolSet

pytestmark = pytest.mark.cpu

TABLE = {"47": 1234, "5": 6}


def lookup(key: str) -> int:
    return TABLE[key]


LOOKUP = Tool(
    name="lookup",
    description="The value stored under a key.",
    parameters={"type": "object", "properties": {"key": {"type": "string", "description": "the key"}}, "required": ["key"]},
    function=lookup,
)


def typed_tool(function=None) -> Tool:
    """A tool with one parameter of each JSON type, the last two optional."""
    properties = {
        "text": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "items": {"type": "array"},
        "options": {"type": "object"},
        "unit": {"type": "string", "enum": ["cm", "m"]},
    }

    def echo(text, count, ratio, flag, items, options=None, unit="m"):
        return {"text": text, "count": count, "ratio": ratio, "flag": flag, "items": items, "options": options, "unit": unit}

    required = ["text", "count", "ratio", "flag", "items"]
    return Tool("echo", "Returns its arguments.", {"type": "object", "properties": properties, "required": required}, function or echo)


GOOD = {"text": "a", "count": 3, "ratio": 0.5, "flag": True, "items": [1, 2]}


def test_schema_is_the_openai_declaration():
    assert LOOKUP.schema() == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "The value stored under a key.",
            "parameters": {"type": "object", "properties": {"key": {"type": "string", "description": "the key"}}, "required": ["key"]},
        },
    }


def test_invoke_returns_text():
    assert LOOKUP.invoke({"key": "47"}) == "1234"
    assert json.loads(typed_tool().invoke(GOOD)) == {**GOOD, "options": None, "unit": "m"}
    as_is = Tool("say", "", {"type": "object", "properties": {}}, lambda: "plain text")
    assert as_is.invoke({}) == "plain text"
    listing = Tool("keys", "", {"type": "object"}, lambda: ["é", 1])
    assert listing.invoke({}) == '["é", 1]'
    number = Tool("seven", "", {"type": "object"}, lambda: 7.5)
    assert number.invoke({}) == "7.5"


def test_an_integral_float_is_an_integer_and_reaches_the_function_as_int():
    seen = []
    tool = typed_tool(lambda **arguments: seen.append(arguments) or "ok")
    tool.invoke({**GOOD, "count": 3.0, "ratio": 2})
    assert type(seen[0]["count"]) is int and seen[0]["ratio"] == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "lookup: missing argument 'key'"),
        ({"key": "5", "extra": 1}, "lookup: unknown argument 'extra' (takes key)"),
        ({"key": 47}, "lookup: argument 'key' must be of type string, got integer 47"),
        (["47"], "lookup: arguments must be an object, got array"),
        ({"key": {1, 2}}, "lookup: argument 'key' must be of type string, got set {1, 2}"),
        ({"key": "x"}, "lookup raised KeyError: 'x'"),
    ],
)
def test_invoke_errors_are_short_messages_for_the_model(arguments, message):
    with pytest.raises(ToolError) as raised:
        LOOKUP.invoke(arguments)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "name, value, got",
    [
        ("count", "3", 'string "3"'),
        ("count", 2.5, "number 2.5"),
        ("count", True, "boolean true"),
        ("ratio", "0.5", 'string "0.5"'),
        ("flag", 1, "integer 1"),
        ("items", "1,2", 'string "1,2"'),
        ("options", [], "array []"),
        ("text", None, "null null"),
    ],
)
def test_invoke_checks_each_json_type(name, value, got):
    tool = typed_tool()
    with pytest.raises(ToolError) as raised:
        tool.invoke({**GOOD, name: value})
    assert str(raised.value) == f"echo: argument {name!r} must be of type {tool.properties[name]['type']}, got {got}"


def test_invoke_checks_enum():
    with pytest.raises(ToolError, match=r"""^echo: argument 'unit' must be one of \["cm", "m"\], got "km"$"""):
        typed_tool().invoke({**GOOD, "unit": "km"})


def test_a_long_exception_text_is_cut():
    def fail():
        raise RuntimeError("x" * 1000)

    with pytest.raises(ToolError) as raised:
        Tool("fail", "", {"type": "object"}, fail).invoke({})
    assert str(raised.value) == "fail raised RuntimeError: " + "x" * 200
    assert isinstance(raised.value.__cause__, RuntimeError)


KEY = {"key": {"type": "string"}}


def by_key(key):
    return key


def nothing():
    return 0


@pytest.mark.parametrize(
    "name, parameters, function, message",
    [
        ("2fast", {"type": "object"}, nothing, "tool name '2fast': must be a word"),
        ("look up", {"type": "object"}, nothing, "tool name 'look up'"),
        ("lookup", {"type": "array"}, nothing, "tool 'lookup': parameters must be a JSON schema object"),
        ("lookup", {"type": "object", "properties": []}, nothing, "tool 'lookup': parameters.properties must be an object"),
        ("lookup", {"type": "object", "properties": {"key": {}}}, by_key, "tool 'lookup': parameters.properties.key must have a type"),
        (
            "lookup",
            {"type": "object", "properties": {"key": {"type": ["string", "null"]}}},
            by_key,
            "tool 'lookup': parameters.properties.key must have a type, one of string",
        ),
        (
            "lookup",
            {"type": "object", "properties": {"key": {"type": "text"}}},
            by_key,
            "tool 'lookup': parameters.properties.key must have a type, one of string, integer",
        ),
        (
            "lookup",
            {"type": "object", "properties": {"my-key": {"type": "string"}}},
            nothing,
            "tool 'lookup': parameters.properties name 'my-key' must be a Python identifier",
        ),
        (
            "lookup",
            {"type": "object", "properties": KEY, "required": ["id"]},
            by_key,
            "tool 'lookup': parameters.required names ['id'] not in parameters.properties (key)",
        ),
        ("lookup", {"type": "object", "properties": KEY, "required": "key"}, by_key, "tool 'lookup': parameters.required must be a list"),
        (
            "lookup",
            {"type": "object", "properties": KEY, "required": ["key"]},
            nothing,
            "tool 'lookup': function nothing cannot take the declared parameters ['key']",
        ),
        (
            "lookup",
            {"type": "object", "properties": KEY},
            by_key,
            "tool 'lookup': function by_key needs argument 'key' but parameters.required does not list it",
        ),
        ("lookup", {"type": "object"}, "lookup", "tool 'lookup': function must be callable, got str"),
    ],
)
def test_malformed_declarations_name_the_tool_and_field(name, parameters, function, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Tool(name, "", parameters, function)


def test_functions_with_defaults_or_keywords_are_accepted():
    Tool("lookup", "", {"type": "object", "properties": KEY}, lambda key="0": key)
    Tool("lookup", "", {"type": "object", "properties": KEY, "required": ["key"]}, lambda **kwargs: kwargs)


def test_tool_set_by_name_refuses_duplicates():
    tools = ToolSet([LOOKUP, typed_tool()])
    assert list(tools) == ["lookup", "echo"] and tools["lookup"] is LOOKUP and "echo" in tools and len(tools) == 2
    assert tools.schemas() == [LOOKUP.schema(), typed_tool().schema()]
    with pytest.raises(ValueError, match="two tools are named 'lookup'"):
        ToolSet([LOOKUP, LOOKUP])
    with pytest.raises(ValueError, match="a tool set holds Tool objects, got dict"):
        ToolSet([LOOKUP.schema()])
