"""The model families megarl serves: one table, and the lookup of a HF config's family.

A new family is a :class:`~megarl.models.family.ModelFamily` (in its own module when it needs
functions of its own, as ``qwen2_moe.py``) and one row of :data:`FAMILIES`: the lookups read the
table and nothing else.
"""

from __future__ import annotations

import functools

from megarl.models.deepseek_v3 import DEEPSEEK_V3
from megarl.models.family import ModelFamily, UnsupportedModel
from megarl.models.glm4_moe import GLM4_MOE
from megarl.models.llama import LLAMA, QWEN2
from megarl.models.qwen2_moe import QWEN2_MOE
from megarl.models.qwen3 import QWEN3, QWEN3_MOE

FAMILIES: tuple[ModelFamily, ...] = (LLAMA, QWEN2, QWEN3, QWEN3_MOE, QWEN2_MOE, GLM4_MOE, DEEPSEEK_V3)
"""Every family, each serving the HF ``architectures`` it lists (no architecture twice: the first
lookup refuses a table that breaks this)."""


@functools.cache
def _by_architecture(families: tuple[ModelFamily, ...]) -> dict[str, ModelFamily]:
    """HF architecture -> the family of ``families`` serving it."""
    table: dict[str, ModelFamily] = {}
    for family in families:
        for architecture in family.architectures:
            if architecture in table:
                raise ValueError(f"architecture {architecture} is served by both {table[architecture].name} and {family.name}")
            table[architecture] = family
    return table


def family_of(hf_config) -> ModelFamily:
    """The family serving ``hf_config.architectures``; :class:`UnsupportedModel` when none does."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    by_architecture = _by_architecture(FAMILIES)
    for architecture in architectures:
        if architecture in by_architecture:
            return by_architecture[architecture]
    raise UnsupportedModel(
        f"no megarl model family serves architectures {architectures}; supported: "
        f"{', '.join(sorted(by_architecture))} (a new family is a row of FAMILIES in megarl/models/families.py)"
    )


def checked_family(hf_config) -> ModelFamily:
    """The family of ``hf_config`` once every option it declares has a value it implements.

    Raises:
        UnsupportedModel: naming every option and value it does not implement.
    """
    family = family_of(hf_config)
    problems = [problem for option in family.options if (problem := option.problem(hf_config, family.name))]
    if problems:
        raise UnsupportedModel("; ".join(problems) + ": megarl refuses to convert it rather than convert it wrong")
    return family
