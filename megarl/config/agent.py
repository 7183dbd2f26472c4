"""The ``agent`` section: multi-turn episodes with an environment (issue 19).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class AgentConfig(Section):
    """Multi-turn rollouts: the environment each episode runs in, its tools, and the limits."""

    environment: Optional[str] = None
    """The environment of every episode: a registered name (``toy_lookup``) or
    ``path/to/file.py:ClassName``; null: single-turn rollouts (verl: rollout.multi_turn.enable with
    an agent loop, slime: --custom-generate-function-path)."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the environment's constructor (one instance per episode)."""
    tool_parser: Optional[str] = None
    """How tool calls are read from a model turn: ``hermes`` (``<tool_call>{json}</tool_call>``, what
    Qwen2.5/Qwen3 emit) or ``compact`` (the bundled tiny tokenizer's words); passed to the
    environment as its ``tool_parser`` argument; null: the environment's own choice. The preflight
    checks the name against ``megarl.agents.parsers.TOOL_PARSERS`` (verl: rollout.multi_turn.format)."""
    max_turns: Annotated[int, Range(ge=1)] = 4
    """Model turns per episode (verl: rollout.multi_turn.max_assistant_turns)."""
    max_tokens_per_turn: Annotated[Optional[int], Range(ge=1)] = None
    """Tokens of one model turn; null: whatever is left of data.max_response_length, which bounds
    the whole episode after the prompt (model turns and observations)."""
    num_workers: Annotated[int, Range(ge=1)] = 2
    """Environment worker processes; each hosts many episodes."""
    step_timeout_s: Annotated[float, Range(gt=0)] = 30.0
    """Limit of one reset or step of an environment, seconds; an episode over it fails (score 0,
    counted in agent/env_timeouts) and its worker is replaced."""

    @property
    def enabled(self) -> bool:
        return self.environment is not None

    def environment_kwargs(self) -> dict[str, Any]:
        """The environment constructor's keyword arguments: ``env_kwargs``, and ``tool_parser``
        when it is set."""
        if self.tool_parser is None:
            return dict(self.env_kwargs)
        return {**self.env_kwargs, "tool_parser": self.tool_parser}

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if self.environment is not None and not self.environment.strip():
            yield "environment", "must be a registered name or path/to/file.py:ClassName, or null for single-turn rollouts"
