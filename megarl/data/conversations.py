"""Chat datasets for supervised fine-tuning: conversations tokenized with the model's chat
template, with a loss mask on the assistant turns, served in shuffled batches whose position a
checkpoint can save.

A row holds a conversation under ``data.messages_key``::

    {"messages": [{"role": "user", "content": "max 9 4 7"}, {"role": "assistant", "content": "9"}]}

The conversation is rendered by the tokenizer's chat template and tokenized without adding special
tokens (the template writes them). The tokens of assistant turn ``i`` are those the rendering of
``messages[: i + 1]`` adds to the rendering of ``messages[:i]`` with the generation prompt: the
turn's content and what the template closes it with (its end-of-turn token, which teaches the model
to stop, and the newline after it). Only they carry loss; the system, user and tool turns and the
generation prompts (``<|im_start|>assistant``) are context.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megarl.config import resolve_data_path
from megarl.config.sft import SFTDataConfig
from megarl.data.datasets import DataError, _EpochOrder, _read_rows


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    """One tokenized conversation.

    Attributes:
        token_ids: the rendered conversation's tokens.
        loss_mask: per token, whether it belongs to an assistant turn (the model learns to write it).
        source: where the row came from: ``path:line`` (jsonl) or ``path row N`` (json, parquet).
    """

    token_ids: list[int]
    loss_mask: list[bool]
    source: str

    @property
    def context_length(self) -> int:
        """The tokens before the first assistant token (at least 1: the first token is never predicted)."""
        return max(1, self.loss_mask.index(True))


def _messages_of(row: Any, location: str, key: str) -> list[dict[str, str]]:
    """The row's messages, checked: a list of ``{"role": str, "content": str}`` with an assistant turn."""
    if not isinstance(row, dict):
        raise DataError(f"{location}: a row must be an object with a {key!r} field (data.messages_key), found {type(row).__name__}")
    if key not in row:
        raise DataError(f"{location}: no field {key!r} (data.messages_key); the row has {sorted(row)}: fix the row or set data.messages_key")
    messages = row[key]
    if not (
        isinstance(messages, list)
        and messages
        and all(isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str) for message in messages)
    ):
        raise DataError(
            f"{location}: field {key!r} must be a non-empty list of {{'role': str, 'content': str}} messages, "
            f"found {json.dumps(messages, default=str)[:80]}"
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{location}: the conversation has no assistant turn, so nothing to learn: add one or remove the row")
    return messages


def tokenize_conversation(messages: Sequence[dict[str, str]], tokenizer, location: str) -> tuple[list[int], list[bool]]:
    """``(token_ids, loss_mask)`` of a conversation (see the module's docstring).

    Raises:
        DataError: the chat template renders an assistant turn in a way that changes the tokens
            before it (the turn cannot be told apart), naming the row.
    """

    def render(part: Sequence[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(list(part), add_generation_prompt=generation_prompt, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    token_ids: list[int] = []
    loss_mask: list[bool] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context, whole = render(messages[:index], True), render(messages[: index + 1], False)
        if whole[: len(context)] != context or context[: len(token_ids)] != token_ids:
            raise DataError(
                f"{location}: the chat template renders assistant turn {index} so that the tokens before it change: "
                f"its tokens cannot be told apart; use a template that appends each turn"
            )
        loss_mask += [False] * (len(context) - len(token_ids)) + [True] * (len(whole) - len(context))
        token_ids = whole
    rendered = render(messages, False)
    # Turns after the last assistant turn (a closing user turn) are context.
    loss_mask += [False] * (len(rendered) - len(token_ids))
    return rendered, loss_mask


def check_conversation_file(path: Path, messages_key: str) -> None:
    """A look before the run builds anything (:func:`megarl.preflight.check_sft_run`): ``path``
    exists in a known format and every row holds a conversation under ``messages_key`` with an
    assistant turn. Tokens are counted by :func:`load_conversations`.

    Raises:
        DataError: naming the file and the first bad row, what is wrong and the fix.
    """
    for location, row in _read_rows(path):
        _messages_of(row, location, messages_key)


def load_conversations(config: SFTDataConfig, tokenizer) -> list[Conversation]:
    """Every conversation of ``data.train_files``, files in the order listed, rows in file order.

    Raises:
        DataError: a file that is missing or not a dataset, or a row without messages, without an
            assistant turn or over ``data.max_length`` tokens, naming the file and row.
    """
    conversations = []
    for file in config.train_files:
        for location, row in _read_rows(Path(resolve_data_path(file))):
            token_ids, loss_mask = tokenize_conversation(_messages_of(row, location, config.messages_key), tokenizer, location)
            if len(token_ids) > config.max_length:
                raise DataError(f"{location}: the conversation has {len(token_ids)} tokens, over data.max_length ({config.max_length}): raise it or shorten the row")
            if not any(loss_mask[1:]):
                raise DataError(f"{location}: the assistant turn renders to no token after the first: nothing to learn")
            conversations.append(Conversation(token_ids=token_ids, loss_mask=loss_mask, source=location))
    if not conversations:
        raise DataError(f"{', '.join(config.train_files)}: no conversations: give data.train_files with rows")
    return conversations


class ConversationLoader:
    """The conversations, ``batch_size`` at a time, without end: epoch after epoch, each in its own
    order (drawn from ``(seed, epoch)``), a batch running on into the next epoch. :meth:`state_dict`
    saves the position and :meth:`load_state_dict` continues from it."""

    def __init__(self, conversations: list[Conversation], batch_size: int, *, shuffle: bool, seed: int):
        self.conversations = conversations
        self.batch_size = batch_size
        self._order = _EpochOrder(np.arange(len(conversations)), shuffle=shuffle, key=(seed,))

    def __next__(self) -> list[Conversation]:
        return [self.conversations[int(position)] for position in self._order.take(self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        """The position, JSON-serialisable; the count guards against resuming on other data."""
        return {"epoch": self._order.epoch, "index": self._order.index, "num_conversations": len(self.conversations)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the position was saved over another number of conversations.
        """
        if state["num_conversations"] != len(self.conversations):
            raise DataError(
                f"the saved data position is for {state['num_conversations']} conversations but data.train_files now hold "
                f"{len(self.conversations)}: restore the original files or start a new run (checkpoint.resume=never)"
            )
        self._order.epoch, self._order.index = state["epoch"], state["index"]
