"""Environments whose model turns call tools: the common case, written once.

A :class:`ToolEnvironment` reads each model turn with a tool-call parser
(:mod:`megarl.agents.parsers`: ``hermes`` for Qwen-style ``<tool_call>`` JSON, ``compact`` for the
bundled tiny tokenizer). A turn with calls runs them and answers with one ``tool`` message per
call, in order (a malformed call, an unknown tool, bad arguments or a tool that raises is answered
with ``error: ...`` and counted); a turn without any call is the final answer and ends the episode.
Subclasses declare ``tools`` and may score the final answer (:meth:`final_reward`); by default the
reward section scores it. Every step reports ``tool_calls`` and ``tool_errors`` (metrics
``env/tool_calls``, ``env/tool_errors``: per episode, averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from megarl.agents.environment import Environment, StepResult
from megarl.agents import parsers
from megarl.agents.parsers import ParsedTurn
from megarl.agents.tools import Tool, ToolError


class ToolEnvironment(Environment):
    """Model turns are tool calls or a final answer (see the module docstring).

    Args:
        tool_parser: the parser's name; None: the class's :attr:`default_tool_parser`
            (``agent.tool_parser`` sets it for a run).
    """

    default_tool_parser: ClassVar[str] = "hermes"

    def __init__(self, tool_parser: str | None = None):
        self.parser = parsers.tool_parser(tool_parser or type(self).default_tool_parser)

    def episode_tools(self) -> Sequence[Tool]:
        """The tools this episode runs: the class's ``tools``, or, for tools that read the
        episode's state, the same declarations bound to it (override)."""
        return type(self).tools

    def final_reward(self, answer: ParsedTurn) -> float | None:
        """The episode's reward for its final turn; None (the default) leaves it to the reward
        section, which scores the turn's text."""
        return None

    def step(self, model_turn: str) -> StepResult:
        tools = {tool.name: tool for tool in self.episode_tools()}
        turn = self.parser.parse(model_turn, tools)
        if not turn.calls and not turn.errors:
            return StepResult(None, reward=self.final_reward(turn), done=True, info={"tool_calls": 0.0, "tool_errors": 0.0})
        answers, errors = [], len(turn.errors)
        for call in turn.calls:
            try:
                answers.append(tools[call.name].invoke(call.arguments))
            except ToolError as error:
                answers.append(f"error: {error}")
                errors += 1
        answers += [f"error: {message}" for message in turn.errors]
        observation = [{"role": "tool", "content": answer} for answer in answers]
        return StepResult(observation, done=False, info={"tool_calls": float(len(turn.calls) + len(turn.errors)), "tool_errors": float(errors)})

