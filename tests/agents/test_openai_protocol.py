"""The chat-completions subset the endpoint serves (megarl.agents.openai_protocol), without a server:
requests read, conversations compared as an OpenAI client sends them back, declarations as tools,
answers built."""

from __future__ import annotations

import json

import pytest

from megarl.agents.openai_protocol import RequestError, added_messages, assistant_message, chat_completion, chat_message, declared_tools, read_request
from megarl.agents.parsers import ParsedTurn, ToolCall
from megarl.rollout.sampling import Sample, SamplingParams

pytestmark = pytest.mark.cpu

LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}}
SAMPLING = SamplingParams(max_new_tokens=8, temperature=1.0)
ASKED = [{"role": "user", "content": "key 4 7"}]


def test_a_request_is_read_with_the_episode_tools_when_it_sends_none():
    request = read_request({"messages": ASKED, "max_completion_tokens": 5, "max_tokens": 9, "temperature": 1, "stop": []}, SAMPLING, [LOOKUP])
    assert request.declarations == [LOOKUP] and list(request.tools) == ["lookup"]
    assert (request.max_tokens, request.logprobs, request.model) == (5, False, "megarl")
    assert read_request({"messages": ASKED, "tools": []}, SAMPLING, [LOOKUP]).tools == {}
    with pytest.raises(RequestError, match="^the request body must be a JSON object, got array"):
        read_request([ASKED], SAMPLING, [])
    with pytest.raises(RequestError, match='^tool_choice "required" is not served'):
        read_request({"messages": ASKED, "tool_choice": "required"}, SAMPLING, [])


def test_the_history_compares_as_a_client_sends_it_back():
    parsed = ParsedTurn(content="", calls=[ToolCall("lookup", {"key": "4 7"})], errors=[])
    answer = assistant_message("lookup 4 7", parsed, turn_index=0)
    assert answer == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_0_0", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "4 7"}'}}],
    }
    conversation = [chat_message(ASKED[0], 0), chat_message(answer, 1)]
    # The client's copy: content "" for null, arguments spelled otherwise, other ids and extra fields.
    echoed = {"role": "assistant", "content": "", "refusal": None, "tool_calls": [{"id": "x", "type": "function", "function": {"name": "lookup", "arguments": '{"key":"4 7"}'}}]}
    result = {"role": "tool", "tool_call_id": "x", "content": "7"}
    assert added_messages([chat_message(message, index) for index, message in enumerate([*ASKED, echoed, result])], conversation) == [result]
    with pytest.raises(RequestError, match="^messages\\[2\\] has role 'system'"):
        added_messages([*conversation, {"role": "system", "content": "again"}], conversation)
    with pytest.raises(RequestError, match="^messages add nothing after the conversation so far \\(2 messages\\)"):
        added_messages(conversation, conversation)
    with pytest.raises(RequestError, match="^messages\\[1\\].tool_calls\\[0\\].function.arguments is a string but not JSON"):
        chat_message({**echoed, "tool_calls": [{"function": {"name": "lookup", "arguments": "{key"}}]}, 1)


def test_a_malformed_call_is_answered_as_the_whole_text():
    parsed = ParsedTurn(content="I look", calls=[ToolCall("lookup", {})], errors=["tool call 2: invalid JSON"])
    assert assistant_message("I look <tool_call>{}</tool_call> <tool_call>{", parsed, 0) == {"role": "assistant", "content": "I look <tool_call>{}</tool_call> <tool_call>{"}


def test_declarations_outside_the_tool_schema_subset_are_refused_naming_them():
    optional = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": ["string", "null"]}}}}}
    with pytest.raises(RequestError, match="^tools\\[1\\]: tool 'search': parameters.properties.query must have a type") as refused:
        declared_tools([LOOKUP, optional], "tools")
    assert refused.value.param == "tools[1]"
    with pytest.raises(RequestError, match="^tools\\[1\\]: a second tool named 'lookup'"):
        declared_tools([LOOKUP, LOOKUP], "tools")
    assert declared_tools([{"type": "function", "function": {"name": "now"}}], "tools")["now"].properties == {}


def test_a_completion_cut_by_its_limit():
    request = read_request({"messages": ASKED, "model": "policy"}, SAMPLING, [])
    sample = Sample(0, 0, [5, 6], [-0.5, -0.25], "length", None, ())
    message = {"role": "assistant", "content": "4 7"}
    completion = chat_completion(request, message, sample, prompt_tokens=3, tokenizer=None)
    assert completion["choices"] == [{"index": 0, "message": message, "finish_reason": "length", "logprobs": None}]
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} and completion["model"] == "policy"
    assert json.loads(json.dumps(completion)) == completion
