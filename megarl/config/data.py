"""The ``data`` section: prompt datasets and length limits.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterator
from typing import Annotated, Literal, Optional

from megarl.config.base import Range, Section


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig(Section):
    """Prompt datasets and length limits."""

    train_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/train.jsonl"])
    """Prompt datasets (jsonl, json or parquet); ``bundled:NAME`` is a file shipped in
    megarl/assets/data (verl: data.train_files, slime: --prompt-data)."""
    train_file_weights: Annotated[
        list[float], Range(gt=0, fix="remove a file from data.train_files instead of giving it weight 0")
    ] = dataclasses.field(default_factory=list)
    """Mixing ratios of the training files, one positive weight per entry of train_files: each
    prompt of a batch comes from file i with probability weight_i / sum, and each file is served in
    its own shuffled order, epoch after epoch; empty: the files are concatenated and the whole is
    served in one order per epoch (OpenRLHF: --prompt_data_probs)."""
    val_files: list[str] = dataclasses.field(default_factory=lambda: ["bundled:toy/val.jsonl"])
    """Validation datasets; empty: no validation (verl: data.val_files, slime: --eval-prompt-data)."""
    max_samples: Annotated[Optional[int], Range(ge=1)] = None
    """Use at most the first N usable training prompts, in file order after length filtering and
    truncation; null: all of them (verl: data.train_max_samples, OpenRLHF: --max_samples)."""
    val_max_samples: Annotated[Optional[int], Range(ge=1)] = None
    """The same limit for the validation prompts (verl: data.val_max_samples)."""
    prompt_key: str = "prompt"
    """Row field holding the prompt: a string or a list of chat messages (verl: data.prompt_key,
    slime: --input-key)."""
    answer_key: str = "answer"
    """Row field holding the reference answer the reward checks; a dotted path reaches into nested
    fields, e.g. ``reward_model.ground_truth`` for verl's parquet rows (verl: reward_model.ground_truth
    of each row, slime: --label-key)."""
    apply_chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template (slime/OpenRLHF: --apply-chat-template)."""
    input_template: Optional[str] = None
    """With apply_chat_template false, the text each string prompt is put into at its one ``{}``,
    e.g. ``"User: {}\nAssistant: "`` (written as str.format reads it: ``{{`` and ``}}`` are literal
    braces); null: the prompt as it is. Refused with apply_chat_template true: the chat template
    already wraps the prompt, and one of the two would be silently dropped (OpenRLHF:
    --input_template, which it ignores under --apply_chat_template)."""
    max_prompt_length: Annotated[int, Range(ge=1)] = 64
    """Prompt length limit, tokens (verl: data.max_prompt_length)."""
    max_response_length: Annotated[int, Range(ge=1)] = 16
    """Generated length limit, tokens (verl: data.max_response_length, slime:
    --rollout-max-response-len)."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than max_prompt_length; false: keep them as truncation says (verl:
    data.filter_overlong_prompts)."""
    truncation: Literal["error", "left", "right"] = "error"
    """What happens to a prompt longer than max_prompt_length that filter_overlong_prompts keeps:
    ``error`` stops with the file and row, ``left`` keeps its last max_prompt_length tokens,
    ``right`` its first; a truncated prompt's text (what the reward sees) is its truncated tokens,
    decoded (verl: data.truncation)."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (verl: data.shuffle, slime: --rollout-shuffle)."""
    seed: int = 1
    """Shuffling seed; with train_file_weights also the seed of each batch's files."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if not self.train_files:
            yield "train_files", "must list at least one file"
        if self.train_file_weights and len(self.train_file_weights) != len(self.train_files):
            yield "train_file_weights", (
                f"(length {len(self.train_file_weights)}) must have the length of `data.train_files` ({len(self.train_files)}): "
                f"one positive weight per file, or an empty list to concatenate the files"
            )
        if self.input_template is not None:
            problem = _template_problem(self.input_template)
            if problem:
                yield "input_template", f"({self.input_template!r}) {problem}"
            elif self.apply_chat_template:
                yield "input_template", (
                    "is set but so is `data.apply_chat_template` (true, the default): the chat template already wraps each prompt; "
                    "set data.apply_chat_template=false to use the input template, or remove data.input_template"
                )
        if self.truncation != "error" and self.filter_overlong_prompts:
            yield "truncation", (
                f"({self.truncation}) has no effect while data.filter_overlong_prompts is true (it drops every prompt "
                f"over the limit): set data.filter_overlong_prompts=false to truncate them"
            )


def _template_problem(template: str) -> str | None:
    """What keeps ``template`` from taking a prompt at exactly one ``{}`` (read as str.format reads
    it), worded for :class:`~megarl.config.base.FieldError`; None when it can."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return f"is not a format string ({error}): write literal braces as {{{{ and }}}}"
    if fields != [("", "", None)]:
        found = ", ".join("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}" for name, spec, conversion in fields)
        return f"must hold exactly one {{}} where the prompt goes, found {found or 'none'}: write literal braces as {{{{ and }}}}"
    return None
