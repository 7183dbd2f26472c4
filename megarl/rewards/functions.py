"""Reward functions: the bundled rules and user functions, all with one signature.

A reward function is called once per sample::

    def my_reward(prompt: str, response: str, answer: str, **row) -> float | dict:

``row`` carries the dataset row's other fields. It returns the score, or a dict with a ``"score"``
float and any extra numbers, which are averaged into the step's metrics (``reward/<key>``).

Rules: ``toy`` (the bundled toy tasks) and ``math`` (GSM8K / MATH answers checked with math-verify:
the reference answer and the response's last ``\\boxed{}``, or its final number, must be
mathematically equal: ``0.5``, ``1/2`` and ``\\frac{1}{2}`` all match). User functions are given as
``path/to/file.py:name`` and loaded in the reward worker processes.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable

from megarl.rewards.toy import toy_reward

RewardFunction = Callable[..., "float | dict"]

_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _toy(prompt: str, response: str, answer: str, **row) -> float:
    return toy_reward(response, answer)


def _extract_math_answer(response: str) -> str:
    """The response's last ``\\boxed{...}`` if any, else its last number (GSM8K style)."""
    start = response.rfind("\\boxed{")
    if start >= 0:
        depth, position = 0, start + len("\\boxed")
        for index in range(position, len(response)):
            if response[index] == "{":
                depth += 1
            elif response[index] == "}":
                depth -= 1
                if depth == 0:
                    return response[position + 1 : index]
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else ""


def math_reward(prompt: str, response: str, answer: str, **row) -> float:
    """1.0 when the response's final answer equals ``answer`` mathematically (math-verify).

    The final answer is the last ``\\boxed{}`` when there is one; otherwise math-verify's own
    extraction of the response (LaTeX, ``1/2``, "the answer is ..."), then its last number.
    """
    from math_verify import parse, verify

    gold = parse(f"${answer}$") or parse(answer)
    if not gold:
        return 0.0
    extracted = _extract_math_answer(response)
    predictions = []
    if "\\boxed{" not in response:
        predictions.append(parse(response))
    if extracted:
        predictions.append(parse(f"${extracted}$"))
    for predicted in predictions:
        if predicted and verify(gold, predicted):
            return 1.0
    return 0.0


RULES: dict[str, RewardFunction] = {"toy": _toy, "math": math_reward}


def load_function(spec: str) -> RewardFunction:
    """``path/to/file.py:name`` -> the function, with errors that say which part is wrong."""
    path_text, separator, name = spec.rpartition(":")
    if not separator or not path_text or not name:
        raise ValueError(f"reward.function = {spec!r} must look like path/to/file.py:function_name")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"reward.function = {spec!r}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"megarl_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise AttributeError(f"reward.function = {spec!r}: {path} has no function named {name!r}")
    return function


def reward_model(path: str) -> RewardFunction:
    """A HF sequence-classification reward model as a reward function: the score is the first logit
    of ``prompt + response`` (the usual single-output reward head)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score(prompt: str, response: str, answer: str = "", **row) -> float:
        inputs = tokenizer(prompt + response, return_tensors="pt")
        with torch.no_grad():
            return float(model(**inputs).logits[0, 0])

    return score


def resolve(kind: str, target: str) -> RewardFunction:
    """The function for reward ``kind``: ``rule`` (target ``toy`` or ``math``), ``function``
    (target ``path.py:name``) or ``model`` (target a HF sequence-classification directory)."""
    if kind == "rule":
        return RULES[target]
    if kind == "function":
        return load_function(target)
    if kind == "model":
        return reward_model(target)
    raise ValueError(f"reward kind {kind!r} does not run in the pool; expected 'rule', 'function' or 'model'")
