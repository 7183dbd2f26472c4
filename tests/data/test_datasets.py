"""Prompt datasets: file formats, row errors, chat templates, length filtering and truncation, sample
limits, nested answer keys, the resumable loader and its file mixing."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from megarl.config import DataConfig, resolve_model_path
from megarl.data import datasets
from megarl.data.datasets import DataError, Prompt, PromptDataset, PromptLoader, load_prompts
from megarl.rewards.functions import RULES

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:tiny-moe"), local_files_only=True)


def write_jsonl(path, rows):
    """Rows as JSON lines; a str row is written verbatim (a broken line)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def config_for(*files, **fields) -> DataConfig:
    return DataConfig(train_files=[str(file) for file in files], **fields)


def test_bundled_toy_rows_render_with_the_chat_template(tokenizer):
    dataset = load_prompts(DataConfig(), tokenizer)
    assert len(dataset) == 800 and dataset.num_filtered == 0
    first = dataset.prompts[0]
    messages = [{"role": "user", "content": "max 9 5 9"}]
    assert first.text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert first.text.endswith("<|im_start|>assistant\n")
    assert first.prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert (first.answer, first.metadata, first.source.endswith("train.jsonl:1")) == ("9", {"task": "max"}, True)
    assert RULES["toy"](**first.reward_kwargs(" 9<|im_end|>")) == 1.0
    assert RULES["toy"](**first.reward_kwargs(" 4")) == 0.0


def test_plain_text_and_chat_messages(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Answer with a digit."}, {"role": "user", "content": "last 1 2 3"}]
    file = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "first 4 5 6", "answer": "4"}, {"prompt": messages, "answer": 3}])
    templated = load_prompts(config_for(file), tokenizer).prompts
    assert templated[1].text.startswith("<|im_start|>system\nAnswer with a digit.<|im_end|>\n<|im_start|>user\nlast 1 2 3")
    assert templated[1].answer == 3
    plain = load_prompts(config_for(write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "first 4 5 6", "answer": "4"}]), apply_chat_template=False), tokenizer)
    assert plain.prompts[0].text == "first 4 5 6"
    assert plain.prompts[0].prompt_ids == tokenizer("first 4 5 6")["input_ids"]


def test_json_and_jsonl_files_concatenate_in_order(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{"question": "max 1 2 3", "label": "3", "task": "max"}, "", {"question": "max 4 5 6", "label": "6", "task": "max"}])
    second = tmp_path / "b.json"
    second.write_text(json.dumps([{"question": "first 7 8 9", "label": "7", "task": "first", "level": 2}]))
    dataset = load_prompts(config_for(first, second, prompt_key="question", answer_key="label"), tokenizer)
    assert [prompt.answer for prompt in dataset.prompts] == ["3", "6", "7"]
    assert [prompt.source for prompt in dataset.prompts] == [f"{first}:1", f"{first}:3", f"{second} row 0"]
    assert dataset.prompts[2].metadata == {"task": "first", "level": 2}


@pytest.mark.parametrize(
    "rows, fields, expected",
    [
        (['{"prompt": "max 1 2 3", "answer": '], {}, ["bad.jsonl:1", "not valid JSON"]),
        ([{"prompt": "max 1 2 3", "answer": "3"}, {"answer": "3"}], {}, ["bad.jsonl:2", "'prompt'", "data.prompt_key"]),
        ([{"prompt": "max 1 2 3"}], {}, ["bad.jsonl:1", "'answer'", "data.answer_key"]),
        ([{"prompt": 7, "answer": "7"}], {}, ["bad.jsonl:1", "'prompt'", "must be a string or"]),
        ([{"prompt": [{"role": "user"}], "answer": "7"}], {}, ["bad.jsonl:1", "'prompt'", "messages"]),
        (["[1, 2]"], {}, ["bad.jsonl:1", "must be an object"]),
        ([{"prompt": [{"role": "user", "content": "x"}], "answer": "1"}], {"apply_chat_template": False}, ["bad.jsonl:1", "data.apply_chat_template"]),
    ],
)
def test_bad_rows_name_the_file_the_row_and_the_field(tmp_path, tokenizer, rows, fields, expected):
    file = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_prompts(config_for(file, **fields), tokenizer)
    for text in expected:
        assert text in str(error.value)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("rows.json", '{"prompt": "x", "answer": "1"}', "must hold a list of rows"),
        ("rows.json", '[{"prompt": "x", "answer": "1"}, {"answer": "1"}]', "rows.json row 1: no field 'prompt'"),
        ("lines.json", '{"prompt": "x", "answer": "1"}\n{"prompt": "y", "answer": "2"}\n', "must be named .jsonl"),
        ("rows.csv", "prompt,answer\n", "use .jsonl"),
    ],
)
def test_bad_files(tmp_path, tokenizer, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=expected):
        load_prompts(config_for(tmp_path / name), tokenizer)


def test_missing_file_and_empty_split(tmp_path, tokenizer):
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        load_prompts(config_for(tmp_path / "missing.jsonl"), tokenizer)
    with pytest.raises(DataError, match="`data.val_files` lists no files"):
        load_prompts(DataConfig(val_files=[]), tokenizer, "val")


def test_overlong_prompts_are_filtered_and_counted_or_rejected(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "max 1 2 3", "answer": "3"}, {"prompt": " ".join(["max"] * 40), "answer": "0"}, {"prompt": "last 1 2 3", "answer": "3"}]
    file = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="megarl.data.datasets"):
        dataset = load_prompts(config_for(file, max_prompt_length=20), tokenizer)
    assert (len(dataset), dataset.num_filtered) == (2, 1)
    assert "dropped 1 of 3 prompts" in caplog.text
    with pytest.raises(DataError, match=r"long.jsonl:2: field 'prompt' has \d+ tokens, more than data.max_prompt_length \(20\)"):
        load_prompts(config_for(file, max_prompt_length=20, filter_overlong_prompts=False), tokenizer)
    with pytest.raises(DataError, match="no usable prompt"):
        load_prompts(config_for(file, max_prompt_length=2), tokenizer)


def long_rows():
    return [{"prompt": "max 1 2 3", "answer": "3"}, {"prompt": " ".join(["max"] * 40), "answer": "0"}, {"prompt": "last 1 2 3", "answer": "3"}]


@pytest.mark.parametrize("truncation", ["left", "right"])
def test_overlong_prompts_are_truncated_and_the_reward_sees_the_kept_tokens(tmp_path, tokenizer, caplog, truncation):
    file = write_jsonl(tmp_path / "long.jsonl", long_rows())
    full = load_prompts(config_for(file, max_prompt_length=200), tokenizer).prompts
    with caplog.at_level(logging.INFO, logger="megarl.data.datasets"):
        dataset = load_prompts(config_for(file, max_prompt_length=20, filter_overlong_prompts=False, truncation=truncation), tokenizer)
    assert (len(dataset), dataset.num_filtered, dataset.num_truncated) == (3, 0, 1)
    assert "data.train_files: truncated 1 of 3 prompts longer than data.max_prompt_length" in caplog.text
    short, cut = dataset.prompts[0], dataset.prompts[1]
    assert short == full[0]
    kept = full[1].prompt_ids[-20:] if truncation == "left" else full[1].prompt_ids[:20]
    assert cut.prompt_ids == kept and len(full[1].prompt_ids) > 20
    assert cut.text == tokenizer.decode(kept, skip_special_tokens=False) != full[1].text
    # The chat template's ending (the generation prompt) survives a left cut, its opening a right
    # one. (The tiny tokenizer decodes its word-level tokens with spaces between them.)
    assert (cut.text.split()[-1] == "assistant") == (truncation == "left")
    assert (cut.text.split()[0] == "<|im_start|>") == (truncation == "right")
    assert cut.reward_kwargs("0")["prompt"] == cut.text


def test_truncation_error_names_the_row_and_every_fix(tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "long.jsonl", long_rows())
    with pytest.raises(DataError) as error:
        load_prompts(config_for(file, max_prompt_length=20, filter_overlong_prompts=False), tokenizer)
    assert f"{file}:2: field 'prompt' has " in str(error.value)
    assert str(error.value).endswith(
        "raise data.max_prompt_length, set data.filter_overlong_prompts=true to drop such prompts, or set data.truncation to left or right to cut them"
    )


def test_max_samples_keeps_the_first_usable_prompts_in_file_order(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", long_rows())
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"max {digit} 1 1", "answer": str(digit)} for digit in range(5)])
    dataset = load_prompts(config_for(first, second, max_prompt_length=20, max_samples=4), tokenizer)
    # The overlong row of a.jsonl is dropped before the limit counts.
    assert [(prompt.source, prompt.file_index) for prompt in dataset.prompts] == [
        (f"{first}:1", 0), (f"{first}:3", 0), (f"{second}:1", 1), (f"{second}:2", 1)
    ]
    assert len(load_prompts(config_for(first, second, max_prompt_length=20), tokenizer)) == 7
    val = DataConfig(val_files=[str(second)], val_max_samples=2, max_samples=1)
    assert [prompt.answer for prompt in load_prompts(val, tokenizer, "val").prompts] == ["0", "1"]


def test_max_samples_stops_reading_at_the_limit(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(datasets, "TOKENIZE_ROWS", 2)
    rows = [{"prompt": f"max {digit} 1 1", "answer": str(digit)} for digit in range(4)] + ['{"prompt": broken']
    file = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert len(load_prompts(config_for(file, max_samples=4), tokenizer)) == 4
    with pytest.raises(DataError, match="rows.jsonl:5: not valid JSON"):
        load_prompts(config_for(file), tokenizer)


def verl_row(digit: int, **reward_model) -> dict:
    return {"data_source": "toy", "prompt": [{"role": "user", "content": f"max {digit} 1 1"}], "reward_model": reward_model}


def test_dotted_answer_key_reads_nested_fields(tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "verl.jsonl", [verl_row(7, style="rule", ground_truth="7"), verl_row(8, style="rule", ground_truth=["8"])])
    dataset = load_prompts(config_for(file, answer_key="reward_model.ground_truth"), tokenizer)
    assert [prompt.answer for prompt in dataset.prompts] == ["7", ["8"]]
    # The whole row stays metadata, reward_model included.
    assert dataset.prompts[0].metadata == {"data_source": "toy", "reward_model": {"style": "rule", "ground_truth": "7"}}


@pytest.mark.parametrize(
    "row, answer_key, expected",
    [
        (verl_row(7, style="rule"), "reward_model.ground_truth", "no field 'reward_model.ground_truth' (data.answer_key); field 'reward_model' has ['style']"),
        ({"prompt": "max 1 2 3", "reward_model": "3"}, "reward_model.ground_truth", "field 'reward_model' is a str, not an object with fields"),
        ({"prompt": "max 1 2 3", "label": {"value": "3"}}, "reward_model.ground_truth", "the row has ['label', 'prompt']"),
        ({"prompt": "max 1 2 3", "a": {"b": {"d": 1}}}, "a.b.c", "no field 'a.b.c' (data.answer_key); field 'a.b' has ['d']"),
    ],
)
def test_missing_nested_answer_names_the_row_the_key_and_the_fields(tmp_path, tokenizer, row, answer_key, expected):
    good = {"prompt": "max 1 1 1", "reward_model": {"ground_truth": "1"}, "a": {"b": {"c": "1"}}}
    file = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(DataError) as error:
        load_prompts(config_for(file, answer_key=answer_key), tokenizer)
    assert str(error.value).startswith(f"{file}:2: ")
    assert expected in str(error.value)
    assert str(error.value).endswith("fix the row or set data.answer_key")


def test_verl_parquet_rows_with_a_nested_answer(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([verl_row(3, style="rule", ground_truth="3")]), tmp_path / "verl.parquet")
    (prompt,) = load_prompts(config_for(tmp_path / "verl.parquet", answer_key="reward_model.ground_truth"), tokenizer).prompts
    assert (prompt.answer, prompt.metadata["reward_model"]) == ("3", {"style": "rule", "ground_truth": "3"})


def test_a_weighted_file_must_keep_a_prompt(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", long_rows())
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": " ".join(["max"] * 40), "answer": "0"}])
    third = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "max 1 1 1", "answer": "1"}])
    weights = dict(max_prompt_length=20, train_file_weights=[1.0, 1.0])
    with pytest.raises(DataError) as error:
        load_prompts(config_for(first, second, **weights), tokenizer)
    assert str(error.value) == (
        f"`data.train_files`[1] ({second}) has weight 1.0 in `data.train_file_weights` but keeps no prompt: it has no row "
        f"within data.max_prompt_length (20 tokens); fix the file, or drop the file and its weight"
    )
    with pytest.raises(DataError, match=r"c.jsonl\) has weight 1.0 .* data.max_samples \(2\) is reached in the files before it; raise data.max_samples"):
        load_prompts(config_for(first, third, max_samples=2, **weights), tokenizer)
    assert len(load_prompts(config_for(first, third, max_samples=3, **weights), tokenizer)) == 3


def test_parquet_rows(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"prompt": ["max 1 2 3", "first 4 5 6"], "answer": ["3", "4"], "task": ["max", "first"]})
    pyarrow.parquet.write_table(table, tmp_path / "rows.parquet")
    dataset = load_prompts(config_for(tmp_path / "rows.parquet"), tokenizer)
    assert [(prompt.answer, prompt.metadata, prompt.source) for prompt in dataset.prompts] == [
        ("3", {"task": "max"}, f"{tmp_path / 'rows.parquet'} row 0"),
        ("4", {"task": "first"}, f"{tmp_path / 'rows.parquet'} row 1"),
    ]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"rows.parquet: reading parquet needs pyarrow: `pip install pyarrow`"):
        load_prompts(config_for(tmp_path / "rows.parquet"), tokenizer)


def numbered_dataset(size: int) -> PromptDataset:
    return PromptDataset([Prompt(prompt_ids=[index], text=str(index), answer=index, metadata={}, source=f"row {index}") for index in range(size)])


def take(loader: PromptLoader, count: int) -> list[list[int]]:
    """The next ``count`` batches, each as its prompts' numbers."""
    return [[prompt.answer for prompt in next(loader)] for _ in range(count)]


def test_loader_shuffles_each_epoch_deterministically_and_crosses_epochs():
    dataset = numbered_dataset(10)
    loader = PromptLoader(dataset, 4, seed=3)
    batches = take(loader, 5)
    assert batches == take(PromptLoader(dataset, 4, seed=3), 5)
    flat = [answer for batch in batches for answer in batch]
    first_epoch, second_epoch = flat[:10], flat[10:20]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(10))
    assert first_epoch != second_epoch != list(range(10))
    assert loader.state_dict() == {"epoch": 1, "index": 10, "num_prompts": 10}
    assert take(PromptLoader(dataset, 4, seed=4), 5) != batches
    assert take(PromptLoader(dataset, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_loader_smaller_than_a_batch_repeats_epochs():
    assert take(PromptLoader(numbered_dataset(3), 7, shuffle=False), 1) == [[0, 1, 2, 0, 1, 2, 0]]


@pytest.mark.parametrize("batch_size", [3, 4])
def test_loader_resumes_with_the_same_batches(batch_size):
    dataset = numbered_dataset(10)
    straight = take(PromptLoader(dataset, batch_size, seed=7), 4)
    loader = PromptLoader(dataset, batch_size, seed=7)
    before = take(loader, 2)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PromptLoader(dataset, batch_size, seed=7)
    resumed.load_state_dict(state)
    assert before + take(resumed, 2) == straight


def test_loader_refuses_a_position_saved_over_other_data():
    loader = PromptLoader(numbered_dataset(9), 4)
    with pytest.raises(DataError, match="saved data position is for 10 prompts but the dataset now has 9"):
        loader.load_state_dict(PromptLoader(numbered_dataset(10), 4).state_dict())


def files_dataset(*sizes: int) -> PromptDataset:
    """Prompts answering ``(file, row)``, ``sizes[file]`` rows per file."""
    return PromptDataset(
        [
            Prompt(prompt_ids=[row], text=f"{file}.{row}", answer=(file, row), metadata={}, source=f"file {file} row {row}", file_index=file)
            for file, size in enumerate(sizes)
            for row in range(size)
        ]
    )


def test_mixed_files_are_drawn_in_their_weights_each_in_its_own_epochs():
    weights = [1.0, 2.0, 5.0]
    loader = PromptLoader(files_dataset(5, 20, 7), 8, seed=3, file_weights=weights)
    served = [prompt for _ in range(500) for prompt in take(loader, 1)[0]]
    fractions = np.bincount([file for file, _ in served], minlength=3) / len(served)
    np.testing.assert_allclose(fractions, np.array(weights) / sum(weights), atol=0.02)
    # Each file runs through its rows once per epoch, every epoch in a new order.
    for file, size in enumerate((5, 20, 7)):
        rows = [row for served_file, row in served if served_file == file]
        epochs = [rows[start : start + size] for start in range(0, len(rows) - size + 1, size)]
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) > 1
    again = PromptLoader(files_dataset(5, 20, 7), 8, seed=3, file_weights=weights)
    assert [prompt for _ in range(500) for prompt in take(again, 1)[0]] == served
    unshuffled = PromptLoader(files_dataset(2, 3), 6, shuffle=False, seed=3, file_weights=[1.0, 1.0])
    for file, size in ((0, 2), (1, 3)):
        rows = [row for batch in take(unshuffled, 4) for served_file, row in batch if served_file == file]
        assert rows == [index % size for index in range(len(rows))]


@pytest.mark.parametrize("batch_size", [3, 8])
def test_mixed_loader_resumes_with_the_same_batches(batch_size):
    dataset, weights = files_dataset(4, 9, 2), [3.0, 1.0, 1.0]
    straight = take(PromptLoader(dataset, batch_size, seed=7, file_weights=weights), 12)
    loader = PromptLoader(dataset, batch_size, seed=7, file_weights=weights)
    before = take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["file_prompts"] == [4, 9, 2] and state["batches"] == 5
    resumed = PromptLoader(dataset, batch_size, seed=7, file_weights=weights)
    resumed.load_state_dict(state)
    assert before + take(resumed, 7) == straight


def test_mixed_loader_refuses_a_position_saved_over_other_data():
    saved = PromptLoader(files_dataset(5, 5), 4, file_weights=[1.0, 1.0]).state_dict()
    with pytest.raises(DataError, match=r"for training files of \[5, 5\] prompts but they now hold \[4, 6\]"):
        PromptLoader(files_dataset(4, 6), 4, file_weights=[1.0, 1.0]).load_state_dict(saved)
    with pytest.raises(DataError, match="for training files mixed but data.train_file_weights now has them concatenated"):
        PromptLoader(files_dataset(5, 5), 4).load_state_dict(saved)
    with pytest.raises(DataError, match="for training files concatenated but data.train_file_weights now has them mixed"):
        PromptLoader(files_dataset(5, 5), 4, file_weights=[1.0, 1.0]).load_state_dict(PromptLoader(files_dataset(5, 5), 4).state_dict())


def test_validation_pass_serves_every_row_in_order(tokenizer):
    dataset = load_prompts(DataConfig(), tokenizer, "val")
    batches = list(dataset.batches(64))
    assert [len(batch) for batch in batches] == [64, 64, 64, 8]
    assert [prompt.source for batch in batches for prompt in batch] == [prompt.source for prompt in dataset.prompts]
    assert dataset.prompts[-1].source.endswith("val.jsonl:200")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tokenizer):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "max 1 2 3", "answer": "3"}\n{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{latin}:2: not UTF-8 \(invalid continuation byte at byte \d+\): save the file as UTF-8$"):
        load_prompts(config_for(latin), tokenizer)
    as_json = tmp_path / "latin.json"
    as_json.write_bytes('[{"prompt": "caf\u00e9", "answer": "1"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.json: not UTF-8"):
        load_prompts(config_for(as_json), tokenizer)
