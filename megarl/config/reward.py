"""The ``reward`` section: where scores come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Literal, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class RewardConfig(Section):
    """Where scores come from and how scoring is isolated."""

    type: Literal["rule", "function", "remote", "model"] = "rule"
    """Where scores come from: a bundled rule, a user function, a remote URL or a reward model
    (verl: reward_model.enable / custom_reward_function, slime: --rm-type)."""
    rule: Literal["toy", "math"] = "toy"
    """Bundled rule (type rule): the toy tasks' checker, or math answers compared with math-verify."""
    function: Optional[str] = None
    """User reward as ``path/to/file.py:name`` (type function), with megarl's signature
    ``(prompt, response, answer, **row)`` or verl's ``(data_source, solution_str, ground_truth,
    extra_info)`` (verl: custom_reward_function.path and .name, slime: --custom-rm-path)."""
    batched: bool = False
    """The function (type function) scores a list of samples per call and returns a list of scores;
    reward.timeout_s then applies to a call (verl: reward_model.reward_manager=batch)."""
    url: Optional[str] = None
    """Remote reward endpoint (type remote) (OpenRLHF: --remote_rm_url, slime: --rm-url)."""
    model_path: Optional[str] = None
    """HF sequence-classification reward model directory (type model) (verl: reward_model.model.path)."""
    isolation: Literal["auto", "process", "none"] = "auto"
    """Where the rule, function or model scores (type remote ignores it: the service scores).
    ``process``: in reward.num_workers worker processes; reward.timeout_s is enforced, and a
    sample that hangs or crashes its worker costs that sample (the worker is replaced). ``none``:
    in the training process, in the calling thread, for trusted code only: no timeout can be
    enforced, a hang hangs the run and a crash kills it; it saves a process round trip per sample.
    ``auto``: ``none`` for the bundled toy rule (a regex, it cannot hang) and ``process`` for the
    rest (the math rule, as math-verify can hang on adversarial input; user functions; reward
    models)."""
    num_workers: Annotated[int, Range(ge=1)] = 2
    """Reward worker processes (rule, function and model, with reward.isolation process)."""
    timeout_s: Annotated[float, Range(gt=0)] = 10.0
    """Timeout of one sample's scoring (one request when remote), seconds; a timeout scores 0 and
    is counted. Not enforced with reward.isolation none."""
    max_failure_rate: Annotated[float, Range(ge=0, le=1)] = 0.5
    """Stop the run when more than this fraction of a batch fails to score, in [0, 1]."""
    remote_batch_size: Annotated[int, Range(ge=1)] = 32
    """Samples per remote request."""
    remote_retries: Annotated[int, Range(ge=0)] = 3
    """Retries of a failed remote request."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        needed = {
            "function": ("function", "path/to/file.py:name"),
            "remote": ("url", "an http(s) URL"),
            "model": ("model_path", "a HF directory"),
        }
        if self.type in needed:
            name, form = needed[self.type]
            if not getattr(self, name):
                yield name, f"must be set ({form}) when reward.type is '{self.type}'"
        if self.type == "function":
            if self.function and ":" not in self.function:
                yield "function", f"({self.function!r}) must look like path/to/file.py:function_name"
        elif self.batched:
            yield "batched", f"applies to reward.type function, not {self.type!r}: remove it"
        if self.type == "remote" and self.isolation == "none":
            yield "isolation", "(none) does not apply to reward.type 'remote': the service at reward.url scores, not this process; remove it"

    def resolved_isolation(self) -> Literal["process", "none"]:
        """``isolation`` with ``auto`` decided: ``none`` for the bundled toy rule, ``process`` for
        everything else."""
        if self.isolation != "auto":
            return self.isolation
        return "none" if (self.type, self.rule) == ("rule", "toy") else "process"
