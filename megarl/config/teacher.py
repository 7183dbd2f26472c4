"""The ``teacher`` section: the model that on-policy distillation (``algorithm.use_opd``) asks for
the log-probs of the policy's sampled tokens.

Where it runs is ``algorithm.opd_type``'s choice. ``sglang``: engines of ``rollout.engine``'s kind,
launched by the first rank on its node, never colocated with training and never sent weights, on
the GPUs after the training ranks' and the (not colocated) rollout engines'; or already running
(``engine_urls``). ``megatron``: a second Megatron model on every training rank, built from
``path`` under the training layout, forward only; the engine settings below then stay at their
defaults. Either way it must share the policy's tokenizer, which the preflight checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class TeacherConfig(Section):
    """The distillation teacher: where its weights are, or where its engines run."""

    path: Optional[str] = None
    """The teacher's HF model directory, or ``bundled:NAME`` for one in ``megarl/assets/models``;
    with ``algorithm.opd_type`` sglang megarl launches ``num_engines`` engines on it (slime: the
    teacher server given by --rm-url, started by hand), with megatron the trainer loads it (slime:
    --opd-teacher-load, a Megatron checkpoint there)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """SGLang servers of the teacher that are already running, instead of ``path``; they are not
    restarted, and the preflight cannot read their tokenizer (slime: --rm-url). ``algorithm.opd_type``
    sglang only."""
    num_engines: Annotated[int, Range(ge=1)] = 1
    """Teacher engines to launch (on the first rank's node); the batch's sequences are split
    evenly between them. ``algorithm.opd_type`` sglang only."""
    engine_tensor_parallel: Annotated[int, Range(ge=1)] = 1
    """Tensor parallel size inside each teacher engine (SGLang's --tp-size). ``algorithm.opd_type``
    sglang only: the Megatron teacher takes ``parallel.tensor``."""

    @property
    def configured(self) -> bool:
        """Whether a teacher is given (``path`` or ``engine_urls``)."""
        return self.path is not None or bool(self.engine_urls)

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if self.path is not None and self.engine_urls:
            yield "engine_urls", "and teacher.path are both set: give the teacher's directory (megarl launches its engines) or the URLs of running ones, not both"
