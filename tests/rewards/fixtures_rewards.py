"""Reward functions for the pool tests (loaded by path, as users' are)."""

import os
import time


def good(prompt, response, answer, **row):
    return {"score": 1.0 if response == answer else 0.0, "length": float(len(response))}


def raises(prompt, response, answer, **row):
    if response == "bad":
        raise ValueError("broken reward for 'bad'")
    return 1.0


def numbered(prompt, response, answer, **row):
    """The response's number as the score after a pause of ``row["pause_s"]`` (so that the pool's
    workers answer out of order); a response starting with "bad" raises."""
    time.sleep(row.get("pause_s", 0.0))
    if response.startswith("bad"):
        raise ValueError(f"broken reward for {response!r}")
    return float(response)


def hangs(prompt, response, answer, **row):
    if response == "hang":
        time.sleep(3600)
    return 1.0


def slow(prompt, response, answer, **row):
    time.sleep(0.3)
    return 0.5


def dies(prompt, response, answer, **row):
    if response == "die":
        os._exit(3)
    return 1.0


def not_a_score(prompt, response, answer, **row):
    return "high"


def nan_for_bad(prompt, response, answer, **row):
    return {"bad": float("nan"), "inf": float("inf"), "-inf": {"score": float("-inf")}}.get(response, 1.0)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature."""
    return {"score": float(solution_str == ground_truth), "source_is_toy": float(data_source == "toy"), "has_extra": float(extra_info is not None)}


def verl_without_extra_info(data_source, solution_str, ground_truth):
    return float(solution_str == ground_truth)


def batched(prompt, response, answer, **row):
    """megarl's batched signature: lists under the same names."""
    return [float(r == a) + (0.5 if level == "hard" else 0.0) for r, a, level in zip(response, answer, row["level"])]


def verl_batched(data_sources, solution_strs, ground_truths, extra_infos):
    return [float(s == g) for s, g in zip(solution_strs, ground_truths)]


def batched_wrong_length(prompt, response, answer, **row):
    return [1.0]


def two_arguments(x, y):
    return 1.0


def no_row(prompt, response, answer):
    """megarl's arguments without **row: the row's other fields are not passed."""
    return float(response == answer)


def verl_with_text_extras(data_source, solution_str, ground_truth, extra_info=None):
    """Like verl's math_dapo: extra values that are not numbers."""
    return {"score": 1.0, "acc": True, "pred": "[INVALID]", "none": None}


def batched_numpy(data_sources, solution_strs, ground_truths, extra_infos):
    import numpy

    return numpy.ones(len(solution_strs)) * 0.5
