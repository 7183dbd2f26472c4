"""Rendering an episode's prompt and observations with the chat template: the ids join up with
the engine's ids of the model turns exactly as a whole-conversation render tokenises, for a
Hermes tool call under a Qwen3-like template (byte-level BPE trained here) and for the bundled
word-level tokenizer; templates that cannot give such ids are refused with the reason."""

from __future__ import annotations

import json

import pytest

from megarl.agents.parsers import HermesParser, ToolCall
from megarl.agents.rendering import ChatTemplateError, observation_ids, prompt_ids
from megarl.config import resolve_model_path
from tests.agents.chat_fixtures import QUESTION, TOOLS, qwen_like_tokenizer, sampled_ids

pytestmark = pytest.mark.cpu

@pytest.fixture(scope="module")
def qwen_like():
    """A tokenizer that behaves as Qwen3's does with tools (tests/agents/chat_fixtures.py)."""
    return qwen_like_tokenizer()


def bundled(chat_template: str | None = None):
    """The bundled word-level tokenizer, with another chat template when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("bundled:tiny-moe"), local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def whole_conversation(tokenizer, messages, tools=None) -> list[int]:
    """The ids of the whole conversation rendered at once, up to the next generation prompt."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def as_message(call: ToolCall) -> dict:
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def test_the_tools_are_rendered_into_the_prompt(qwen_like):
    ids = prompt_ids(qwen_like, [QUESTION], TOOLS.schemas())
    text = qwen_like.decode(ids)
    assert text.startswith("<|im_start|>system\nTools you can call")
    assert "<tools>\n" + json.dumps(TOOLS["lookup"].schema()) + "\n</tools>" in text
    assert text.endswith("<|im_start|>user\nWhat is the value stored under key 47?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == whole_conversation(qwen_like, [QUESTION], TOOLS.schemas())


def test_a_hermes_call_is_parsed_invoked_and_answered_with_the_ids_of_a_whole_render(qwen_like):
    schemas = TOOLS.schemas()
    prompt = prompt_ids(qwen_like, [QUESTION], schemas)
    turn = sampled_ids(qwen_like, 'I will look it up.\n<tool_call>\n{"name": "lookup", "arguments": {"key": "47"}}\n</tool_call>')

    parsed = HermesParser().parse(qwen_like.decode(turn, skip_special_tokens=True), TOOLS)
    assert parsed.content == "I will look it up." and parsed.calls == [ToolCall("lookup", {"key": "47"})] and not parsed.errors
    result = TOOLS["lookup"].invoke(parsed.calls[0].arguments)
    assert result == "1234"
    observation = observation_ids(qwen_like, [{"role": "tool", "content": result}], tools=schemas)
    assert qwen_like.decode(observation) == (
        "\n<|im_start|>user\n<tool_response>\n1234\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )

    answered = [
        QUESTION,
        {"role": "assistant", "content": parsed.content, "tool_calls": [as_message(call) for call in parsed.calls]},
        {"role": "tool", "content": result},
    ]
    whole = whole_conversation(qwen_like, answered, schemas)
    boundary = len(prompt) + len(turn)
    assert whole[boundary - 1] == qwen_like.eos_token_id
    assert whole[boundary:] == observation
    assert prompt + turn + observation == whole


def test_consecutive_tool_results_are_one_user_turn(qwen_like):
    calls = [ToolCall("lookup", {"key": "47"}), ToolCall("lookup", {"key": "5"})]
    results = [{"role": "tool", "content": TOOLS["lookup"].invoke(call.arguments)} for call in calls]
    observation = observation_ids(qwen_like, results, tools=TOOLS.schemas())
    text = qwen_like.decode(observation)
    assert text.count("<|im_start|>") == 2 and text.count("<tool_response>") == 2
    conversation = [QUESTION, {"role": "assistant", "content": "", "tool_calls": [as_message(call) for call in calls]}]
    whole = whole_conversation(qwen_like, conversation + results, TOOLS.schemas())
    assert whole[-len(observation) :] == observation and whole[-len(observation) - 1] == qwen_like.eos_token_id


def test_a_user_observation(qwen_like):
    prompt = prompt_ids(qwen_like, [QUESTION])
    turn = sampled_ids(qwen_like, "The answer is 47.")
    retry = {"role": "user", "content": "Try again."}
    observation = observation_ids(qwen_like, [retry])
    assert qwen_like.decode(observation) == "\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"
    answered = [QUESTION, {"role": "assistant", "content": "The answer is 47."}]
    assert prompt + turn + observation == whole_conversation(qwen_like, [*answered, retry])
    # Why observation_ids does not render the conversation without the observation and take the
    # difference: ending with the assistant turn adds the empty think block.
    ended = qwen_like.apply_chat_template(answered, tokenize=False)
    assert not qwen_like.apply_chat_template([*answered, retry], tokenize=False).startswith(ended)


def test_the_bundled_tokenizer():
    tokenizer = bundled()
    question = {"role": "user", "content": "key 4 7"}
    prompt = prompt_ids(tokenizer, [question], TOOLS.schemas())
    # The bundled template lists the tools by name in a system turn.
    assert tokenizer.convert_ids_to_tokens(prompt)[:5] == ["<|im_start|>", "system", "tool", "lookup", "<|im_end|>"]
    assert prompt[5:] == prompt_ids(tokenizer, [question])
    turn = sampled_ids(tokenizer, "lookup 4 7")
    result = {"role": "tool", "content": "7"}
    observation = observation_ids(tokenizer, [result], tools=TOOLS.schemas())
    assert tokenizer.convert_ids_to_tokens(observation) == ["<|im_start|>", "tool", "7", "<|im_end|>", "<|im_start|>", "assistant"]
    assert prompt + turn + observation == whole_conversation(
        tokenizer, [question, {"role": "assistant", "content": "lookup 4 7"}, result], TOOLS.schemas()
    )


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "observation messages must be a non-empty list"),
        ({"role": "tool", "content": "7"}, "observation messages must be a non-empty list"),
        ([{"role": "assistant", "content": "7"}], "observation message 0 has role 'assistant': observation messages have role tool or user"),
        ([{"role": "tool", "content": "7"}, {"role": "tool", "content": 7}], "observation message 1 must be a dict with a string 'content'"),
    ],
)
def test_malformed_observations(messages, message):
    with pytest.raises(ChatTemplateError, match="^" + message):
        observation_ids(bundled(), messages)


def test_templates_that_cannot_join_up_are_refused():
    no_end_of_turn = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not end an assistant message with the end-of-turn token '<\\|im_end\\|>'"):
        observation_ids(bundled(no_end_of_turn), [{"role": "tool", "content": "7"}])
    drops_tools = "{% for m in messages if m['role'] != 'tool' %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not render observation message 0 \\(role 'tool'\\) after the assistant turn"):
        observation_ids(bundled(drops_tools), [{"role": "tool", "content": "7"}])
    ignores_content = "{% for m in messages %}{{ m['role'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not render an assistant message's content once and as is"):
        observation_ids(bundled(ignores_content), [{"role": "tool", "content": "7"}])
    without_template = bundled()
    without_template.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        prompt_ids(without_template, [QUESTION])
