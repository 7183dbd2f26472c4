"""Prompt datasets: rows from jsonl, json and parquet files, tokenized, filtered by length, and
served in shuffled batches whose position a checkpoint can save.

A row holds the prompt under ``data.prompt_key`` (a string, or a list of ``{"role", "content"}``
chat messages), the reference answer under ``data.answer_key`` (any JSON value, handed to the reward
as it is) and any other fields, kept as metadata and handed to the reward as keyword arguments::

    {"prompt": "max 9 4 7", "answer": "9", "task": "max"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": 42}

With ``data.apply_chat_template`` the prompt is rendered by the tokenizer's chat template with the
generation prompt appended (a string prompt becomes one user message) and tokenized without adding
special tokens, since the template writes them; otherwise the string is tokenized as it is, with the
tokenizer's usual special tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from megarl.config import DataConfig, resolve_data_path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names the file, the row, the field
    and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    """One tokenized prompt and what its reward needs."""

    prompt_ids: list[int]
    """The tokens the engine continues."""
    text: str
    """The prompt as the model reads it: the rendered chat template, or the plain string."""
    answer: Any
    """The row's reference answer, unchanged."""
    metadata: dict[str, Any]
    """The row's other fields (e.g. the toy ``task``)."""
    source: str
    """Where the row came from: ``path:line`` (jsonl) or ``path row N`` (json, parquet; N from 0)."""

    def reward_kwargs(self, response: str) -> dict[str, Any]:
        """The keyword arguments of a reward function for one response to this prompt.

        The metadata comes first, so a row field named ``prompt``, ``response`` or ``answer`` cannot
        shadow the sample's own.
        """
        return {**self.metadata, "prompt": self.text, "response": response, "answer": self.answer}


@dataclasses.dataclass(slots=True)
class PromptDataset:
    """The prompts of one split, files concatenated in the order listed, rows in file order."""

    prompts: list[Prompt]
    num_filtered: int = 0
    """Rows dropped for being longer than ``data.max_prompt_length``."""

    def __len__(self) -> int:
        return len(self.prompts)

    def batches(self, batch_size: int) -> Iterator[list[Prompt]]:
        """Every prompt once, in order, ``batch_size`` at a time (the last batch may be shorter):
        the validation pass."""
        for start in range(0, len(self.prompts), batch_size):
            yield self.prompts[start : start + batch_size]


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: `pip install pyarrow`, or convert the file to jsonl") from None
    return pyarrow.parquet.read_table(path).to_pylist()


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for each row of one file; blank jsonl lines are skipped."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unknown dataset format {suffix!r}: use .jsonl (one row per line), .json (a list of rows) or .parquet")
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}): fix or remove the line") from None
                yield f"{path}:{number}", row
        return
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            hint = "; a file with one row per line must be named .jsonl" if error.msg == "Extra data" else ""
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}){hint}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json dataset must hold a list of rows, found a JSON {type(rows).__name__}")
    else:
        rows = _read_parquet(path)
    for index, row in enumerate(rows):
        yield f"{path} row {index}", row


def check_file(path: Path, config: DataConfig) -> None:
    """A quick look before a run builds anything: ``path`` exists in a known format and its first
    row is an object with the prompt and answer fields (parquet: the columns). The whole file is
    read and checked row by row by :func:`load_prompts`.

    Raises:
        DataError: naming the file (and row), what is wrong and the fix.
    """
    if path.suffix.lower() == ".parquet" and path.is_file():
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: `pip install pyarrow`, or convert the file to jsonl") from None
        try:
            columns = pyarrow.parquet.ParquetFile(path).schema_arrow.names
        except Exception as error:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
        _check_fields(dict.fromkeys(columns), f"{path} (columns)", config)
        return
    for location, row in _read_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{location}: a row must be an object with fields, found {type(row).__name__}")
        _check_fields(row, location, config)
        return
    raise DataError(f"{path} holds no rows")


def _check_fields(row: dict[str, Any], location: str, config: DataConfig) -> None:
    for key, setting in ((config.prompt_key, "data.prompt_key"), (config.answer_key, "data.answer_key")):
        if key not in row:
            raise DataError(f"{location}: no field {key!r} ({setting}); the row has {sorted(row)}: fix the row or set {setting}")


def _is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str) for message in prompt)
    )


def _parse_row(row: Any, location: str, config: DataConfig, tokenizer) -> tuple[str, Any, dict[str, Any]]:
    """One row -> the text the model reads, the answer, and the other fields."""
    if not isinstance(row, dict):
        raise DataError(f"{location}: a row must be an object with fields, found {type(row).__name__}")
    _check_fields(row, location, config)
    prompt, field = row[config.prompt_key], f"field {config.prompt_key!r} (data.prompt_key)"
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif _is_messages(prompt):
        if not config.apply_chat_template:
            raise DataError(
                f"{location}: {field} is a list of chat messages but data.apply_chat_template is false: "
                f"set data.apply_chat_template=true or store the prompt as a string"
            )
        messages = prompt
    else:
        raise DataError(
            f"{location}: {field} must be a string or a non-empty list of {{'role': str, 'content': str}} messages, "
            f"found {json.dumps(prompt, default=str)[:80]}"
        )
    if config.apply_chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    metadata = {key: value for key, value in row.items() if key not in (config.prompt_key, config.answer_key)}
    return text, row[config.answer_key], metadata


def load_prompts(config: DataConfig, tokenizer, split: Literal["train", "val"] = "train") -> PromptDataset:
    """Read, check, tokenize and length-filter the files of one split.

    Args:
        config: the ``data`` section: files, keys, chat template and length settings.
        tokenizer: a HF tokenizer (with a chat template when ``data.apply_chat_template``).
        split: ``train`` reads ``data.train_files``, ``val`` reads ``data.val_files``.

    Returns:
        The prompts, with the count of those dropped for length.

    Raises:
        DataError: a missing or unreadable file, a row that is not an object, a missing or
            ill-typed prompt or answer, a prompt over the length limit when
            ``data.filter_overlong_prompts`` is false, or no prompt left. The message names the
            file, the row and the field.
    """
    files_key = f"data.{split}_files"
    files = config.train_files if split == "train" else config.val_files
    if not files:
        raise DataError(f"`{files_key}` lists no files")
    if config.apply_chat_template and not tokenizer.chat_template:
        raise DataError(
            f"data.apply_chat_template is true but tokenizer {tokenizer.name_or_path!r} has no chat template: "
            f"set data.apply_chat_template=false or use a tokenizer with one"
        )
    texts, answers, metadata, sources = [], [], [], []
    for name in files:
        for location, row in _read_rows(resolve_data_path(name)):
            text, answer, fields = _parse_row(row, location, config, tokenizer)
            texts.append(text)
            answers.append(answer)
            metadata.append(fields)
            sources.append(location)
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
    token_ids = tokenizer(texts, add_special_tokens=not config.apply_chat_template)["input_ids"] if texts else []
    prompts, num_filtered = [], 0
    for ids, text, answer, fields, location in zip(token_ids, texts, answers, metadata, sources):
        if len(ids) > config.max_prompt_length:
            if not config.filter_overlong_prompts:
                raise DataError(
                    f"{location}: field {config.prompt_key!r} has {len(ids)} tokens, more than data.max_prompt_length "
                    f"({config.max_prompt_length}): raise data.max_prompt_length or set data.filter_overlong_prompts=true"
                )
            num_filtered += 1
            continue
        prompts.append(Prompt(prompt_ids=list(ids), text=text, answer=answer, metadata=fields, source=location))
    if num_filtered:
        log.info("%s: dropped %d of %d prompts longer than data.max_prompt_length (%d tokens)", files_key, num_filtered, len(texts), config.max_prompt_length)
    if not prompts:
        raise DataError(
            f"`{files_key}` {files} hold no usable prompt ({len(texts)} rows, {num_filtered} longer than "
            f"data.max_prompt_length = {config.max_prompt_length})"
        )
    return PromptDataset(prompts, num_filtered)


class PromptLoader:
    """Training prompts, ``batch_size`` at a time, without end: epoch after epoch, each in its own
    order, a batch running on into the next epoch when the current one runs out.

    Epoch ``e``'s order is a permutation drawn from ``(seed, e)`` (or file order without shuffling),
    so the position ``(epoch, index)`` alone fixes every batch to come: :meth:`state_dict` saves it
    and :meth:`load_state_dict` on a fresh loader over the same data continues with exactly the
    batches the saved loader would have served.

    Attributes:
        epoch: the epoch the last batch ended in (0 first).
        index: prompts of the current epoch's order already served.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, *, shuffle: bool = True, seed: int = 1):
        if batch_size < 1 or not dataset.prompts:
            raise ValueError(f"need a batch size >= 1 (got {batch_size}) and at least one prompt (got {len(dataset)})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._cached_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the dataset's positions, drawn once per epoch."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
            else:
                order = np.arange(len(self.dataset))
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[Prompt]:
        batch = []
        order = self._order(self.epoch)
        while len(batch) < self.batch_size:
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            taken = order[self.index : self.index + self.batch_size - len(batch)]
            batch += [self.dataset.prompts[position] for position in taken]
            self.index += len(taken)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position, JSON-serialisable; the prompt count guards against resuming on other data."""
        return {"epoch": self.epoch, "index": self.index, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the position was saved over a different number of prompts.
        """
        if state["num_prompts"] != len(self.dataset):
            raise DataError(
                f"the saved data position is for {state['num_prompts']} prompts but the dataset now has "
                f"{len(self.dataset)}: resuming would not continue the same batches; restore the original "
                f"data files (and length settings) or start a new run"
            )
        self.epoch, self.index = state["epoch"], state["index"]
