"""The bundled multi-turn toy task: the digit hidden behind a key (``bundled:lookup``,
``configs/moe_agent.yaml``).

A ``lookup`` row's prompt names a key in words (``key first yes``); its answer is a digit that
the prompt does not determine (``tools/make_assets.py``), so a model that answers at once is right
about one time in ten. The ``lookup`` tool returns the digit: the model that calls it (``lookup``,
in the bundled tokenizer's compact format) and then answers with the digit it read is always right.
``copy`` rows (``copy 7``) show their digit in the prompt: they teach the model to answer with a
digit it has read. The reward section's toy rule scores the final turn (its first number against
the row's answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from megarl.agents.environment import register_environment
from megarl.agents.tool_environment import ToolEnvironment
from megarl.agents.tools import Tool


def _unbound_lookup() -> str:
    raise RuntimeError("lookup reads an episode's hidden digit: LookupEnvironment.episode_tools binds it to the episode")


LOOKUP = Tool(
    name="lookup",
    description="The digit hidden behind this prompt's key.",
    parameters={"type": "object", "properties": {}},
    function=_unbound_lookup,
)
"""The declaration rendered into prompts; each episode runs a copy bound to its row."""


@register_environment("toy_lookup")
class LookupEnvironment(ToolEnvironment):
    """The toy lookup task (see the module docstring)."""

    tools = (LOOKUP,)
    default_tool_parser = "compact"

    def reset(self, row: dict[str, Any]) -> None:
        self.hidden = str(row["answer"])
        return None

    def episode_tools(self) -> Sequence[Tool]:
        return (dataclasses.replace(LOOKUP, function=lambda: self.hidden),)
