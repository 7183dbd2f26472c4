"""The ``agent`` section: multi-turn episodes with an environment, or played by an agent program
that speaks the OpenAI chat-completions API (issue 19).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class AgentConfig(Section):
    """Multi-turn rollouts: the environment each episode runs in (or the agent program that plays
    it), its tools, and the limits."""

    environment: Optional[str] = None
    """The environment of every episode: a registered name (``toy_lookup``) or
    ``path/to/file.py:ClassName``; null: single-turn rollouts (verl: rollout.multi_turn.enable with
    an agent loop, slime: --custom-generate-function-path)."""
    openai_agent: Optional[str] = None
    """An agent program that plays every episode over the OpenAI chat-completions API instead of
    an environment: ``path/to/agent.py:function``, where ``function(base_url, row) -> float | None``
    plays one episode against ``base_url`` (an OpenAI client's ``base_url``, served by megarl in
    front of the engines) and returns the episode's reward, or None to let the reward section score
    the last model turn; ``row`` holds the dataset row's fields (``prompt``, ``answer``, ...). The
    program sends its tools in each request. Set at most one of ``agent.environment`` and
    ``agent.openai_agent`` (AReaL: OpenAI-compatible agent workflows; slime: custom generate
    functions)."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the environment's constructor (one instance per episode)."""
    tool_parser: Optional[str] = None
    """How tool calls are read from a model turn: ``hermes`` (``<tool_call>{json}</tool_call>``, what
    Qwen2.5/Qwen3 emit) or ``compact`` (the bundled tiny tokenizer's words); passed to the
    environment as its ``tool_parser`` argument; null: the environment's own choice (``hermes`` for
    an ``agent.openai_agent``, whose chat endpoint reads the calls). The preflight
    checks the name against ``megarl.agents.parsers.TOOL_PARSERS`` (verl: rollout.multi_turn.format)."""
    max_turns: Annotated[int, Range(ge=1)] = 4
    """Model turns per episode (verl: rollout.multi_turn.max_assistant_turns)."""
    max_tokens_per_turn: Annotated[Optional[int], Range(ge=1)] = None
    """Tokens of one model turn; null: whatever is left of data.max_response_length, which bounds
    the whole episode after the prompt (model turns and observations)."""
    num_workers: Annotated[int, Range(ge=1)] = 2
    """Environment (or agent program) worker processes; each hosts many episodes (a program's
    episodes run on threads of its worker)."""
    step_timeout_s: Annotated[float, Range(gt=0)] = 30.0
    """Limit of one reset or step of an environment, seconds; an episode over it fails (score 0,
    counted in agent/env_timeouts) and its worker is replaced."""
    episode_timeout_s: Annotated[float, Range(gt=0)] = 600.0
    """Limit of one episode of an ``agent.openai_agent`` program, seconds, its model turns
    included; an episode over it fails (score 0, counted in agent/env_timeouts), the endpoint
    refuses its program's further calls, and its worker is replaced once the round ends (a
    program's thread cannot be stopped otherwise)."""

    @property
    def enabled(self) -> bool:
        return self.environment is not None or self.openai_agent is not None

    def environment_kwargs(self) -> dict[str, Any]:
        """The environment constructor's keyword arguments: ``env_kwargs``, and ``tool_parser``
        when it is set."""
        if self.tool_parser is None:
            return dict(self.env_kwargs)
        return {**self.env_kwargs, "tool_parser": self.tool_parser}

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if self.environment is not None and not self.environment.strip():
            yield "environment", "must be a registered name or path/to/file.py:ClassName, or null for single-turn rollouts"
        if self.openai_agent is not None and not self.openai_agent.strip():
            yield "openai_agent", "must be path/to/agent.py:function, or null"
        if self.environment is not None and self.openai_agent is not None:
            yield "openai_agent", (
                f"and agent.environment ({self.environment!r}) are both set: an episode is played either by an environment or by "
                f"an agent program; set one of agent.environment and agent.openai_agent to null"
            )
