"""Prompt datasets: rows from jsonl, json and parquet files, tokenized, filtered by length, and
served in shuffled batches whose position a checkpoint can save.

A row holds the prompt under ``data.prompt_key`` (a string, or a list of ``{"role", "content"}``
chat messages), the reference answer under ``data.answer_key`` (any JSON value, handed to the reward
as it is; a dotted key reaches into nested fields) and any other fields, kept as metadata and handed
to the reward as keyword arguments::

    {"prompt": "max 9 4 7", "answer": "9", "task": "max"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": 42}
    {"prompt": [...], "reward_model": {"ground_truth": "42"}}     # verl's rows: reward_model.ground_truth

With ``data.apply_chat_template`` the prompt is rendered by the tokenizer's chat template with the
generation prompt appended (a string prompt becomes one user message) and tokenized without adding
special tokens, since the template writes them; otherwise the string (put into ``data.input_template``
at its ``{}`` when one is set) is tokenized as it is, with the tokenizer's usual special tokens. A prompt over ``data.max_prompt_length`` tokens is dropped, cut
to the limit, or refused (``data.filter_overlong_prompts``, ``data.truncation``);
``data.max_samples`` then keeps the first usable prompts in file order.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
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
    """The prompt as the model reads it: the rendered chat template, or the plain string; for a
    truncated prompt, its kept tokens decoded."""
    answer: Any
    """The row's reference answer, unchanged."""
    metadata: dict[str, Any]
    """The row's other fields (e.g. the toy ``task``)."""
    source: str
    """Where the row came from: ``path:line`` (jsonl) or ``path row N`` (json, parquet; N from 0)."""
    file_index: int = 0
    """The row's file: its position in ``data.train_files`` (or ``data.val_files``), the source that
    ``data.train_file_weights`` mixes."""

    def reward_kwargs(self, response: str) -> dict[str, Any]:
        """The keyword arguments of a reward function for one response to this prompt.

        The metadata comes first, so a row field named ``prompt``, ``response`` or ``answer`` cannot
        shadow the sample's own.
        """
        return {**self.metadata, "prompt": self.text, "response": response, "answer": self.answer}


@dataclasses.dataclass(slots=True)
class PromptDataset:
    """The prompts of one split, files concatenated in the order listed, rows in file order; each
    prompt names its file (:attr:`Prompt.file_index`)."""

    prompts: list[Prompt]
    num_filtered: int = 0
    """Rows dropped for being longer than ``data.max_prompt_length``."""
    num_truncated: int = 0
    """Prompts cut to ``data.max_prompt_length`` tokens (``data.truncation``)."""

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
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start}): save the file as UTF-8") from None
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
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 ({error.reason} at byte {error.start}): save the file as UTF-8") from None
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
        for key, setting in ((config.prompt_key, "data.prompt_key"), (config.answer_key.split(".")[0], "data.answer_key")):
            if key not in columns and not (setting == "data.answer_key" and config.answer_key in columns):
                raise DataError(f"{path}: no column {key!r} ({setting}); the file has {sorted(columns)}: fix the file or set {setting}")
        return
    for location, row in _read_rows(path):
        _answer_of(row, location, config)
        return
    raise DataError(f"{path} holds no rows")


def _answer_of(row: Any, location: str, config: DataConfig) -> Any:
    """The row's answer (:func:`_answer`), once the row is known to be an object with a prompt."""
    if not isinstance(row, dict):
        raise DataError(f"{location}: a row must be an object with fields, found {type(row).__name__}")
    if config.prompt_key not in row:
        raise DataError(
            f"{location}: no field {config.prompt_key!r} (data.prompt_key); the row has {sorted(row)}: fix the row or set data.prompt_key"
        )
    return _answer(row, location, config.answer_key)


def _is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str) for message in prompt)
    )


def _answer(row: dict[str, Any], location: str, key: str) -> Any:
    """The row's value under ``data.answer_key``: a field, or a dotted path into nested fields
    (``reward_model.ground_truth``)."""
    if key in row:
        return row[key]
    value, path = row, []
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            where = f"field {'.'.join(path)!r}" if path else "the row"
            has = f"has {sorted(value)}" if isinstance(value, dict) else f"is a {type(value).__name__}, not an object with fields"
            raise DataError(f"{location}: no field {key!r} (data.answer_key); {where} {has}: fix the row or set data.answer_key")
        value = value[part]
        path.append(part)
    return value


def _parse_row(row: Any, location: str, config: DataConfig, tokenizer, tools: Sequence[dict] | None) -> tuple[str, Any, dict[str, Any]]:
    """One row -> the text the model reads, the answer, and the other fields."""
    answer = _answer_of(row, location, config)
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
        text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt if config.input_template is None else config.input_template.format(prompt)
    metadata = {key: value for key, value in row.items() if key not in (config.prompt_key, config.answer_key)}
    return text, answer, metadata


TOKENIZE_ROWS = 1024
"""Rows tokenized in one call: enough to amortise the call, few enough that ``data.max_samples``
stops reading a large file soon after its last prompt."""


def _tokenized_rows(path: Path, config: DataConfig, tokenizer, tools: Sequence[dict] | None) -> Iterator[tuple[str, str, Any, dict[str, Any], list[int]]]:
    """``(location, text, answer, metadata, token ids)`` for each row of one file."""
    rows = _read_rows(path)
    while chunk := list(itertools.islice(rows, TOKENIZE_ROWS)):
        parsed = [(location, *_parse_row(row, location, config, tokenizer, tools)) for location, row in chunk]
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
        token_ids = tokenizer([text for _, text, _, _ in parsed], add_special_tokens=not config.apply_chat_template)["input_ids"]
        for (location, text, answer, metadata), ids in zip(parsed, token_ids):
            yield location, text, answer, metadata, list(ids)


@dataclasses.dataclass(slots=True)
class _LengthTally:
    """What the length limit did to the rows read so far."""

    rows: int = 0
    filtered: int = 0
    truncated: int = 0


def _usable_prompts(files: Sequence[str], config: DataConfig, tokenizer, tally: _LengthTally, tools: Sequence[dict] | None) -> Iterator[Prompt]:
    """The prompts of ``files`` in file order, each within ``data.max_prompt_length`` tokens:
    overlong ones dropped (and counted) with ``data.filter_overlong_prompts``, else cut as
    ``data.truncation`` says, or refused."""
    limit = config.max_prompt_length
    for file_index, name in enumerate(files):
        for location, text, answer, metadata, ids in _tokenized_rows(resolve_data_path(name), config, tokenizer, tools):
            tally.rows += 1
            if len(ids) > limit:
                if config.filter_overlong_prompts:
                    tally.filtered += 1
                    continue
                if config.truncation == "error":
                    raise DataError(
                        f"{location}: field {config.prompt_key!r} has {len(ids)} tokens, more than data.max_prompt_length ({limit}): "
                        f"raise data.max_prompt_length, set data.filter_overlong_prompts=true to drop such prompts, or set "
                        f"data.truncation to left or right to cut them"
                    )
                ids = ids[-limit:] if config.truncation == "left" else ids[:limit]
                # The reward reads what the model reads.
                text = tokenizer.decode(ids, skip_special_tokens=False)
                tally.truncated += 1
            yield Prompt(prompt_ids=ids, text=text, answer=answer, metadata=metadata, source=location, file_index=file_index)


def load_prompts(config: DataConfig, tokenizer, split: Literal["train", "val"] = "train", *, tools: Sequence[dict] | None = None) -> PromptDataset:
    """Read, check, tokenize and length-limit the files of one split.

    Args:
        config: the ``data`` section: files, keys, chat template, length and sample limits.
        tokenizer: a HF tokenizer (with a chat template when ``data.apply_chat_template``).
        split: ``train`` reads ``data.train_files`` (at most ``data.max_samples`` prompts), ``val``
            reads ``data.val_files`` (at most ``data.val_max_samples``).
        tools: tool declarations (OpenAI function schemas) the chat template renders into every
            prompt, for multi-turn episodes (``agent.environment``'s tools); None: no tools.

    Returns:
        The prompts, with the counts of those dropped and truncated for length.

    Raises:
        DataError: a missing or unreadable file, a row that is not an object, a missing or
            ill-typed prompt or answer, a prompt over the length limit when it is neither filtered
            nor truncated, no prompt left, or (with ``data.train_file_weights``) a training file
            with no prompt left. The message names the file, the row and the field.
    """
    files_key = f"data.{split}_files"
    files, max_samples = (config.train_files, config.max_samples) if split == "train" else (config.val_files, config.val_max_samples)
    if not files:
        raise DataError(f"`{files_key}` lists no files")
    if config.apply_chat_template and not tokenizer.chat_template:
        raise DataError(
            f"data.apply_chat_template is true but tokenizer {tokenizer.name_or_path!r} has no chat template: "
            f"set data.apply_chat_template=false or use a tokenizer with one"
        )
    tally = _LengthTally()
    # Reading stops at the limit: the files' later rows are not read.
    prompts = list(itertools.islice(_usable_prompts(files, config, tokenizer, tally, tools), max_samples))
    limit = config.max_prompt_length
    if tally.filtered:
        log.info("%s: dropped %d of %d prompts longer than data.max_prompt_length (%d tokens)", files_key, tally.filtered, tally.rows, limit)
    if tally.truncated:
        kept = "last" if config.truncation == "left" else "first"
        log.info(
            "%s: truncated %d of %d prompts longer than data.max_prompt_length to their %s %d tokens (data.truncation = %s)",
            files_key, tally.truncated, tally.rows, kept, limit, config.truncation,
        )
    if not prompts:
        raise DataError(
            f"`{files_key}` {files} hold no usable prompt ({tally.rows} rows, {tally.filtered} longer than "
            f"data.max_prompt_length = {limit})"
        )
    if split == "train" and config.train_file_weights:
        _require_prompts_in_weighted_files(prompts, config)
    return PromptDataset(prompts, tally.filtered, tally.truncated)


def _require_prompts_in_weighted_files(prompts: list[Prompt], config: DataConfig) -> None:
    """Raise a DataError naming the first training file with a weight but no prompt to serve."""
    per_file = collections.Counter(prompt.file_index for prompt in prompts)
    for file_index, (name, weight) in enumerate(zip(config.train_files, config.train_file_weights)):
        if per_file[file_index]:
            continue
        if len(prompts) == config.max_samples and prompts[-1].file_index < file_index:
            why, fix = f"data.max_samples ({config.max_samples}) is reached in the files before it", "raise data.max_samples"
        else:
            why, fix = f"it has no row within data.max_prompt_length ({config.max_prompt_length} tokens)", "fix the file"
        raise DataError(
            f"`data.train_files`[{file_index}] ({name}) has weight {weight} in `data.train_file_weights` but keeps no "
            f"prompt: {why}; {fix}, or drop the file and its weight"
        )


class _EpochOrder:
    """One pool of dataset positions served epoch after epoch, each epoch in its own order: a
    permutation drawn from ``(*key, epoch)``, or the pool's order without shuffling.

    Attributes:
        epoch: the epoch the last position served belongs to (0 first).
        index: positions of the current epoch's order already served.
    """

    def __init__(self, positions: np.ndarray, *, shuffle: bool, key: tuple[int, ...]):
        self.positions = positions
        self.shuffle = shuffle
        self.key = key
        self.epoch = 0
        self.index = 0
        self._cached_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the pool, drawn once per epoch."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = np.random.default_rng((*self.key, epoch)).permutation(self.positions) if self.shuffle else self.positions
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` positions, running on into the next epochs when the current one ends."""
        taken = [self.positions[:0]]
        order = self._order(self.epoch)
        while count:
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            part = order[self.index : self.index + count]
            taken.append(part)
            self.index += len(part)
            count -= len(part)
        return np.concatenate(taken)


class PromptLoader:
    """Training prompts, ``batch_size`` at a time, without end: epoch after epoch, each in its own
    order, a batch running on into the next epoch when the current one runs out.

    Without ``file_weights`` the files are one pool: epoch ``e``'s order is a permutation drawn from
    ``(seed, e)`` (or file order without shuffling). With them each file is its own pool, file ``i``'s
    epoch ``e`` drawn from ``(seed, i, e)``, and each prompt of batch ``b`` comes from file ``i``
    with probability ``weight_i / sum``, the files drawn from ``(seed, b)``. The position (each pool's
    epoch and index, and with weights the batch count) alone fixes every batch to come:
    :meth:`state_dict` saves it and :meth:`load_state_dict` on a fresh loader over the same data
    continues with exactly the batches the saved loader would have served.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, *, shuffle: bool = True, seed: int = 1, file_weights: Sequence[float] = ()):
        """Serve ``dataset`` ``batch_size`` prompts at a time, from position 0.

        Args:
            dataset: the training prompts.
            batch_size: prompts per batch.
            shuffle: shuffle every epoch (of every file); false: file order.
            seed: the seed of the orders and of each batch's files.
            file_weights: one positive weight per file of the split (``data.train_file_weights``);
                empty: the files are concatenated.

        Raises:
            ValueError: no prompt, a batch size below 1, or a weighted file without prompts.
        """
        if batch_size < 1 or not dataset.prompts:
            raise ValueError(f"need a batch size >= 1 (got {batch_size}) and at least one prompt (got {len(dataset)})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self._file_probabilities: np.ndarray | None = None
        self._batches = 0  # with weights, batch b's files are drawn from (seed, b)
        if not file_weights:
            self._pools = [_EpochOrder(np.arange(len(dataset)), shuffle=shuffle, key=(seed,))]
            return
        file_index = np.array([prompt.file_index for prompt in dataset.prompts])
        positions = [np.flatnonzero(file_index == file) for file in range(len(file_weights))]
        sizes = [len(pool) for pool in positions]
        if sum(sizes) != len(dataset) or 0 in sizes:
            raise ValueError(
                f"each of the {len(file_weights)} weighted files needs a prompt, and each prompt a weighted file: "
                f"the files hold {sizes} of {len(dataset)}"
            )
        self._file_probabilities = np.asarray(file_weights, dtype=np.float64) / sum(file_weights)
        self._pools = [_EpochOrder(pool, shuffle=shuffle, key=(seed, file)) for file, pool in enumerate(positions)]

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[Prompt]:
        return [self.dataset.prompts[position] for position in self.next_positions()]

    def next_positions(self) -> list[int]:
        """The next batch as positions in ``dataset.prompts`` (what :meth:`__next__` serves)."""
        if self._file_probabilities is None:
            positions = self._pools[0].take(self.batch_size)
        else:
            files = np.random.default_rng((self.seed, self._batches)).choice(len(self._pools), size=self.batch_size, p=self._file_probabilities)
            positions = np.empty(self.batch_size, dtype=np.int64)
            for file, pool in enumerate(self._pools):
                drawn = files == file
                positions[drawn] = pool.take(int(drawn.sum()))
            self._batches += 1
        return [int(position) for position in positions]

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-serialisable; the prompt counts (per file with weights) guard against
        resuming on other data."""
        if self._file_probabilities is None:
            pool = self._pools[0]
            return {"epoch": pool.epoch, "index": pool.index, "num_prompts": len(self.dataset)}
        return {
            "batches": self._batches,
            "file_epochs": [pool.epoch for pool in self._pools],
            "file_indices": [pool.index for pool in self._pools],
            "num_prompts": len(self.dataset),
            "file_prompts": [len(pool.positions) for pool in self._pools],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the position was saved over a different number of prompts (in all, or per
                file), or with the files mixed where they are now concatenated or the reverse.
        """
        if state["num_prompts"] != len(self.dataset):
            raise DataError(
                f"the saved data position is for {state['num_prompts']} prompts but the dataset now has "
                f"{len(self.dataset)}: resuming would not continue the same batches; restore the original "
                f"data files (and length settings, data.max_samples) or start a new run"
            )
        mixing = self._file_probabilities is not None
        if ("file_prompts" in state) != mixing:
            saved, now = ("mixed", "concatenated") if "file_prompts" in state else ("concatenated", "mixed")
            raise DataError(
                f"the saved data position is for training files {saved} but data.train_file_weights now has them {now}: "
                f"resuming would not continue the same batches; restore data.train_file_weights or start a new run"
            )
        if not mixing:
            self._pools[0].epoch, self._pools[0].index = state["epoch"], state["index"]
            return
        sizes = [len(pool.positions) for pool in self._pools]
        if state["file_prompts"] != sizes:
            raise DataError(
                f"the saved data position is for training files of {state['file_prompts']} prompts but they now hold "
                f"{sizes}: resuming would not continue the same batches; restore the original data files (and length "
                f"settings, data.max_samples) or start a new run"
            )
        self._batches = state["batches"]
        for pool, epoch, index in zip(self._pools, state["file_epochs"], state["file_indices"]):
            pool.epoch, pool.index = epoch, index
