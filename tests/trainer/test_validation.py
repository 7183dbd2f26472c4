"""Validation's metrics: pass@k against hand-computed values, per-source grouping, the sampling."""

from __future__ import annotations

import pytest

from megarl.config import load_config
from megarl.data.datasets import Prompt
from megarl.rollout.sampling import SamplingParams
from megarl.trainer.generations import data_source
from megarl.trainer.validation import ValidationScore, pass_at_k, pass_ks, validation_metrics


@pytest.mark.parametrize(
    "n,correct,k,expected",
    [
        (4, 1, 1, 1 / 4),
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3, 2) / C(4, 2)
        (4, 1, 4, 1.0),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3, 2) / C(5, 2)
        (5, 2, 4, 1.0),  # C(3, 4) = 0: any 4 of 5 hold a correct one
        (8, 3, 4, 1 - 5 / 70),  # 1 - C(5, 4) / C(8, 4)
        (4, 0, 4, 0.0),
        (2, 2, 1, 1.0),
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, correct, k, expected):
    assert pass_at_k(n, correct, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_k_grows_with_k():
    assert [pass_at_k(10, correct, 1) for correct in range(11)] == pytest.approx([c / 10 for c in range(11)])
    values = [pass_at_k(10, 3, k) for k in range(1, 11)]
    assert values == sorted(values) and values[-1] == 1.0


@pytest.mark.parametrize("n,correct,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_refuses_impossible_counts(n, correct, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, correct, k)


def test_the_k_reported_are_the_powers_of_two_below_n_and_n():
    assert [pass_ks(n) for n in (1, 2, 3, 4, 6, 8)] == [[], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 6], [1, 2, 4, 8]]


def test_metrics_are_grouped_by_source_and_by_prompt():
    # Two sources, two samples a prompt; a sample is correct at a score of 1 or more.
    scores = [
        ValidationScore("gsm8k", 0, 1.0), ValidationScore("gsm8k", 0, 0.0),  # c = 1
        ValidationScore("gsm8k", 1, 0.0), ValidationScore("gsm8k", 1, 0.5),  # c = 0 (0.5 < 1)
        ValidationScore("math", 2, 1.0), ValidationScore("math", 2, 1.2),  # c = 2
    ]
    metrics = validation_metrics(scores, threshold=1.0)
    assert metrics == pytest.approx({
        "val/accuracy": 3.7 / 6,
        "val/gsm8k/accuracy": 1.5 / 4,
        "val/math/accuracy": 2.2 / 2,
        # pass@1 per prompt: c / n = 1/2, 0, 1; pass@2: 1, 0, 1.
        "val/pass@1": (0.5 + 0 + 1) / 3,
        "val/gsm8k/pass@1": (0.5 + 0) / 2,
        "val/math/pass@1": 1.0,
        "val/pass@2": (1 + 0 + 1) / 3,
        "val/gsm8k/pass@2": 0.5,
        "val/math/pass@2": 1.0,
    })


def test_one_sample_a_prompt_reports_the_accuracies_only():
    scores = [ValidationScore("a", 0, 1.0), ValidationScore("b", 1, 0.0), ValidationScore("b", 2, 1.0)]
    assert validation_metrics(scores, threshold=0.5) == {"val/accuracy": 2 / 3, "val/a/accuracy": 1.0, "val/b/accuracy": 0.5}


def prompt(metadata: dict, file_index: int = 0) -> Prompt:
    return Prompt(prompt_ids=[1], text="q", answer="a", metadata=metadata, source="x:1", file_index=file_index)


def test_a_source_is_the_rows_data_source_else_its_files_name():
    files = ["bundled:toy/val.jsonl", "/data/aime-2024.parquet"]
    assert data_source(prompt({"data_source": "openai/gsm8k"}), files) == "openai/gsm8k"
    assert data_source(prompt({"task": "max"}, file_index=1), files) == "aime-2024"
    assert data_source(prompt({"data_source": ""}, file_index=0), files) == "val"


def test_validation_samples_with_its_own_top_p_and_top_k():
    rollout = load_config(None, ["rollout.top_p=0.9", "rollout.top_k=50", "rollout.val_top_p=0.95", "rollout.val_n_samples=4", "rollout.val_temperature=0.6"]).rollout
    training = SamplingParams.from_config(rollout, max_new_tokens=8, seed=1)
    validation = SamplingParams.from_config(rollout, max_new_tokens=8, seed=1, validation=True)
    assert (training.top_p, training.top_k, training.temperature, training.n) == (0.9, 50, 1.0, 8)
    assert (validation.top_p, validation.top_k, validation.temperature, validation.n) == (0.95, -1, 0.6, 4)
