"""Reward functions: the bundled rules and user functions, with megarl's or verl's signature.

megarl's signature, called once per sample::

    def my_reward(prompt: str, response: str, answer, **row) -> float | dict:

``row`` carries the dataset row's other fields. verl's signature works unchanged, so that a
reward file written for verl needs no edit::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict:

(``data_source`` and ``extra_info`` are the row's fields of those names, ``solution_str`` the
response, ``ground_truth`` the answer; set ``data.answer_key: reward_model.ground_truth`` for verl's
datasets). With ``reward.batched`` the function scores many samples in one call and returns a list:
megarl's takes lists under the same names (``prompt=[...], response=[...], answer=[...]`` and each
row field as a list, None where a row lacks it); verl's is its batch reward manager's
``compute_score(data_sources, solution_strs, ground_truths, extra_infos)``.

A score is a finite number, or a dict with a finite ``"score"`` and any extra numbers, which are
averaged into the step's metrics (``reward/<key>``). Anything else (NaN or inf included) is a
failure: the sample scores 0 and is counted in ``reward/failures``.

Rules: ``toy`` (the bundled toy tasks) and ``math`` (GSM8K / MATH answers checked with math-verify:
the reference answer and the response's last ``\\boxed{}``, or its final number, must be
mathematically equal: ``0.5``, ``1/2`` and ``\\frac{1}{2}`` all match). User functions are given as
``path/to/file.py:name``; :func:`load_function` and :func:`calling_convention` check them before a
run builds anything, and the reward worker processes load them again.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
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


class RewardFunctionError(ValueError):
    """``reward.function`` cannot be used: a missing file, a syntax or import error, no such
    function, or arguments that fit neither megarl's nor verl's signature."""


def load_function(spec: str) -> RewardFunction:
    """``path/to/file.py:name`` -> the function, importing the file.

    Raises:
        RewardFunctionError: naming the setting, the file (and line of a syntax error) or the name.
    """
    path_text, separator, name = spec.rpartition(":")
    where = f"reward.function = {spec!r}"
    if not separator or not path_text or not name:
        raise RewardFunctionError(f"{where} must look like path/to/file.py:function_name")
    path = Path(path_text)
    module = import_user_file(path, f"megarl_user_reward_{path.stem}", where, RewardFunctionError)
    return named_function(module, name, path, where, RewardFunctionError)


def named_function(module: types.ModuleType, name: str, path: Path, where: str, error: type[Exception]) -> Callable:
    """The function ``name`` of the user's file ``path``, imported as ``module`` (:func:`import_user_file`).

    Raises:
        ``error``: its message starts with ``where`` and says that the file defines no such name
            (listing the callables it defines) or that the name is not callable.
    """
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(key for key, value in vars(module).items() if callable(value) and getattr(value, "__module__", None) == module.__name__)
        raise error(f"{where}: {path} has no function named {name!r} (it defines {defined or 'none'})")
    if not callable(function):
        raise error(f"{where}: {path}: {name!r} is a {type(function).__name__}, not a function")
    return function


def import_user_file(path: Path, module_name: str, where: str, error: type[Exception]) -> types.ModuleType:
    """Import the user's Python file ``path`` (a reward function's, an environment's) as the module
    ``module_name``.

    Raises:
        ``error``: its message starts with ``where`` (the setting and its value) and says that the
            file does not exist (relative to which directory), has a syntax error (file and line),
            or raised on import (the exception).
    """
    if not path.is_file():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()}, where the run started)"
        raise error(f"{where}: {path} does not exist{relative}")
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered while it runs, as an import would: dataclasses and pickling look modules up there.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as syntax_error:
        del sys.modules[module_name]
        raise error(f"{where}: {syntax_error.filename}:{syntax_error.lineno}: syntax error: {syntax_error.msg}") from None
    except Exception as import_error:  # noqa: BLE001 - whatever the user's module raises on import
        del sys.modules[module_name]
        raise error(f"{where}: importing {path} failed: {type(import_error).__name__}: {import_error}") from None
    return module


_MEGARL_ARGUMENTS = ("prompt", "response", "answer")
_VERL_ARGUMENTS = ("data_source", "solution_str", "ground_truth", "extra_info")
_VERL_BATCH_ARGUMENTS = ("data_sources", "solution_strs", "ground_truths", "extra_infos")


def calling_convention(function: RewardFunction, spec: str, batched: bool) -> str:
    """Which signature ``function`` has: ``"megarl"`` or ``"verl"`` (see the module docstring).

    Raises:
        RewardFunctionError: the arguments fit neither, or fit the other setting of ``reward.batched``.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return "megarl"  # a builtin or extension function: no signature to read
    names = set(parameters)
    verl, other_verl = (_VERL_BATCH_ARGUMENTS, _VERL_ARGUMENTS) if batched else (_VERL_ARGUMENTS, _VERL_BATCH_ARGUMENTS)
    where = f"reward.function = {spec!r}"
    if other_verl[1] in names and verl[1] not in names:
        hint = "set reward.batched=true (it takes lists)" if not batched else "set reward.batched=false (it takes one sample)"
        raise RewardFunctionError(f"{where} has verl's {'batched ' if not batched else ''}signature ({other_verl[1]}): {hint}")
    if verl[1] in names:
        required = [
            parameter.name for parameter in parameters.values()
            if parameter.default is inspect.Parameter.empty and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            and parameter.name not in verl
        ]
        if required:
            raise RewardFunctionError(f"{where}: verl's signature passes {', '.join(verl)}; it also requires {required}")
        return "verl"
    takes = _accepted(function)
    if all(takes(name) for name in _MEGARL_ARGUMENTS):
        return "megarl"
    signature = f"{getattr(function, '__name__', spec)}{inspect.signature(function)}"
    raise RewardFunctionError(
        f"{where}: {signature} takes neither megarl's arguments (prompt, response, answer, **row) nor verl's "
        f"({', '.join(verl)}){' for reward.batched' if batched else ''}: rename its parameters"
    )


def _accepted(function: RewardFunction) -> Callable[[str], bool]:
    """Whether ``function`` takes a keyword argument of a name: any with ``**kwargs``, else its
    named parameters (a function without ``**row`` is not handed the row's other fields)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return lambda name: True
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return lambda name: True
    return lambda name: name in parameters


def batch_caller(function: RewardFunction, convention: str, batched: bool) -> Callable[[list[dict]], list]:
    """``function`` as ``score(samples) -> values``: one value per sample (each sample the keyword
    arguments of megarl's signature: prompt, response, answer and the row's fields), each call given
    only the arguments the function takes."""
    if convention == "verl":
        takes = _accepted(function)

        def verl_arguments(sample: dict) -> dict:
            return {
                "data_source": sample.get("data_source"), "solution_str": sample["response"],
                "ground_truth": sample["answer"], "extra_info": sample.get("extra_info"),
            }

        if batched:
            def call(samples):
                columns = [verl_arguments(sample) for sample in samples]
                return function(**{plural: [column[single] for column in columns] for single, plural in zip(_VERL_ARGUMENTS, _VERL_BATCH_ARGUMENTS) if takes(plural)})
        else:
            def call(samples):
                return [function(**{name: value for name, value in verl_arguments(sample).items() if takes(name)}) for sample in samples]
        return call
    takes = _accepted(function)
    if batched:
        def call(samples):
            keys = [key for key in dict.fromkeys(key for sample in samples for key in sample) if takes(key)]
            return function(**{key: [sample.get(key) for sample in samples] for key in keys})
        return call
    return lambda samples: [function(**{key: value for key, value in sample.items() if takes(key)}) for sample in samples]


def reward_model(path: str) -> RewardFunction:
    """A HF sequence-classification reward model as a reward function: the score is the first logit
    of ``prompt + response`` (the usual single-output reward head)."""
    import torch
    import transformers

    from megarl.config import resolve_model_path

    path = str(resolve_model_path(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score(prompt: str, response: str, answer: str = "", **row) -> float:
        inputs = tokenizer(prompt + response, return_tensors="pt")
        with torch.no_grad():
            return float(model(**inputs).logits[0, 0])

    return score


def resolve(kind: str, target: str, batched: bool = False) -> Callable[[list[dict]], list]:
    """The scoring call for reward ``kind`` as ``score(samples) -> values`` (:func:`batch_caller`):
    ``rule`` (target ``toy`` or ``math``), ``function`` (target ``path.py:name``, with
    ``batched`` = ``reward.batched``) or ``model`` (target a HF sequence-classification directory)."""
    if kind == "rule":
        return batch_caller(RULES[target], "megarl", batched=False)
    if kind == "function":
        function = load_function(target)
        return batch_caller(function, calling_convention(function, target, batched), batched)
    if kind == "model":
        return batch_caller(reward_model(target), "megarl", batched=False)
    raise ValueError(f"reward kind {kind!r} does not run in the pool; expected 'rule', 'function' or 'model'")
