"""The bundled multi-turn task (megarl.agents.toy) and the tool-calling environment it is built on
(megarl.agents.tool_environment)."""

from __future__ import annotations

import asyncio

import pytest

import megarl.agents.toy  # noqa: F401 - registers toy_lookup
from megarl.agents.environment import load_environment_class
from megarl.agents.tool_environment import ToolEnvironment
from megarl.agents.tools import Tool
from megarl.agents.toy import LOOKUP, LookupEnvironment
from megarl.agents.workers import EnvironmentPool

pytestmark = pytest.mark.cpu


def test_lookup_answers_the_rows_hidden_digit_and_a_turn_without_a_call_ends_the_episode():
    environment = LookupEnvironment()
    assert environment.reset({"prompt": "key 4 7", "answer": "3", "task": "lookup"}) is None
    called = environment.step("lookup")
    assert called.observation == [{"role": "tool", "content": "3"}] and not called.done
    assert called.info == {"tool_calls": 1.0, "tool_errors": 0.0}
    # Words after a call of a tool without parameters are ignored; text before it is content.
    assert environment.step("the key lookup 4 7").observation == [{"role": "tool", "content": "3"}]
    answered = environment.step("3")
    assert answered.done and answered.reward is None and answered.info == {"tool_calls": 0.0, "tool_errors": 0.0}
    # Each episode reads its own row.
    other = LookupEnvironment()
    other.reset({"prompt": "key 4 7", "answer": "8"})
    assert other.step("lookup").observation == [{"role": "tool", "content": "8"}]


def test_the_declaration_is_what_prompts_show_and_the_registered_name_loads_it():
    assert load_environment_class("toy_lookup") is LookupEnvironment
    assert LookupEnvironment.tools == (LOOKUP,) and LOOKUP.schema()["function"]["name"] == "lookup"
    with pytest.raises(RuntimeError, match="binds it to the episode"):
        LOOKUP.function()


class Calculator(ToolEnvironment):
    tools = (
        Tool("add", "a + b", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}, lambda a, b: a + b),
        Tool("fail", "raises", {"type": "object", "properties": {}}, lambda: 1 / 0),
    )

    def reset(self, row):
        return None

    def final_reward(self, answer):
        return 1.0 if answer.content == "5" else 0.0


def test_tool_calls_errors_and_the_final_answer_in_hermes_format():
    environment = Calculator()
    environment.reset({})
    turn = (
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "fail", "arguments": {}}</tool_call><tool_call>{"name": "nope"}</tool_call>'
    )
    result = environment.step(turn)
    contents = [message["content"] for message in result.observation]
    assert contents[0] == "5" and contents[1].startswith("error: fail raised ZeroDivisionError") and contents[2].startswith("error: ")
    assert result.info == {"tool_calls": 3.0, "tool_errors": 2.0} and not result.done
    final = environment.step("5")
    assert final.done and final.reward == 1.0
    with pytest.raises(ValueError, match="not a known tool-call parser"):
        Calculator(tool_parser="yaml")


def test_the_bundled_environment_runs_in_the_workers():
    async def episode(pool):
        await pool.reset("e0", {"prompt": "key 1 2", "answer": "6"})
        called = await pool.step("e0", "lookup")
        answered = await pool.step("e0", "6")
        return called, answered

    with EnvironmentPool("toy_lookup", num_workers=1, step_timeout_s=10) as pool:
        assert pool.tool_schemas() == [LOOKUP.schema()]
        called, answered = asyncio.run(episode(pool))
    assert called.observation == [{"role": "tool", "content": "6"}] and answered.done
