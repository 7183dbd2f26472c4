"""The generation files: one strict-JSON file per step, written whole, with each sample's advantage."""

from __future__ import annotations

import json

import pytest
import torch

from megarl.data.datasets import Prompt
from megarl.trainer.batch import SampleText, TrainBatch
from megarl.trainer.generations import rollout_records, validation_record, write_generations


def strict_lines(path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"{path}: bare {constant}, not strict JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_step_is_one_file_of_json_lines(tmp_path):
    directory = tmp_path / "rollouts"
    write_generations(directory, 0, [{"step": 0, "response": "7\n"}, {"step": 0, "response": "é | \"x\""}])
    write_generations(directory, 1, [{"step": 1, "score": 1.0}])
    assert sorted(path.name for path in directory.iterdir()) == ["0.jsonl", "1.jsonl"]
    assert strict_lines(directory / "0.jsonl") == [{"step": 0, "response": "7\n"}, {"step": 0, "response": "é | \"x\""}]
    assert strict_lines(directory / "1.jsonl") == [{"step": 1, "score": 1.0}]


def test_a_write_that_fails_leaves_the_steps_earlier_file_whole(tmp_path, monkeypatch):
    # A step run again after a resume rewrites its file; a failure halfway through (here, a record
    # JSON refuses) must leave no torn file under the step's name.
    write_generations(tmp_path, 3, [{"score": 1.0}, {"score": 0.0}])
    with pytest.raises(ValueError):
        write_generations(tmp_path, 3, [{"score": 0.5}, {"score": float("nan")}])
    assert strict_lines(tmp_path / "3.jsonl") == [{"score": 1.0}, {"score": 0.0}]
    assert [path.name for path in tmp_path.iterdir()] == ["3.jsonl"]
    write_generations(tmp_path, 3, [{"score": 0.25}])
    assert strict_lines(tmp_path / "3.jsonl") == [{"score": 0.25}]
    assert [path.name for path in tmp_path.iterdir()] == ["3.jsonl"]


def prompt(text: str, metadata: dict, file_index: int = 0) -> Prompt:
    return Prompt(prompt_ids=[], text=text, answer="", metadata=metadata, source="x:1", file_index=file_index)


def test_a_rollout_record_has_the_texts_score_source_and_its_first_response_tokens_advantage():
    # Prompts of 2 and 3 tokens, responses of 2 and 1.
    batch = TrainBatch.from_samples(
        [[5, 6], [5, 6, 7]], [[8, 9], [10]], [[-0.1, -0.2], [-0.3]], [0, 1], [False, True], pad_token_id=0, pad_multiple=1
    )
    advantages = torch.zeros_like(batch.token_values["rollout_log_probs"])
    advantages[0, 1:3] = torch.tensor([0.5, 0.25])  # label space: row 0's response is columns 1-2
    advantages[1, 2] = -1.5
    batch.token_values["advantages"] = advantages
    texts = [
        SampleText(prompt("max 1 2", {"data_source": "toy"}), "2", {"length": 1.0}),
        SampleText(prompt("min 3 4 5", {}, file_index=1), "3 and more", {"ratio": float("inf")}),
    ]
    records = rollout_records(4, texts, torch.tensor([1.0, 0.0]), batch, ["a/first.jsonl", "b/second.parquet"])
    assert records == [
        {"step": 4, "group": 0, "data_source": "toy", "prompt": "max 1 2", "response": "2", "score": 1.0, "advantage": 0.5,
         "truncated": False, "reward_extras": {"length": 1.0}},
        {"step": 4, "group": 1, "data_source": "second", "prompt": "min 3 4 5", "response": "3 and more", "score": 0.0, "advantage": -1.5,
         "truncated": True, "reward_extras": {"ratio": "Infinity"}},
    ]
    # Strict JSON all the way: a non-finite extra is written as the string metrics.jsonl uses.
    json.dumps(records, allow_nan=False)


def test_a_validation_record_names_its_prompt_and_sample():
    text = SampleText(prompt("max 1 2", {"data_source": "gsm8k"}), "2", {})
    assert validation_record(-1, 12, 1, text, 1.0, ["val.jsonl"]) == {
        "step": -1, "index": 12, "sample": 1, "data_source": "gsm8k", "prompt": "max 1 2", "response": "2", "score": 1.0, "reward_extras": {},
    }
