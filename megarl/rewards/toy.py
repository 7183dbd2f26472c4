"""The bundled toy tasks' verifier (``megarl/assets/data/toy``, ``data/minmax``, ``data/lookup``)."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+")


def toy_reward(response: str, answer: str) -> float:
    """1.0 when the first numbers in ``response``, as many as ``answer`` holds, equal them in order,
    else 0.0.

    A toy answer is one digit (``max 3 8 1``: ``8``) or several separated by spaces (``min max 3 8
    1``: ``1 8``). The response may carry anything around and between the numbers (words, the
    end-of-turn token, a cut-off tail); only its first runs of digits count, so a response with
    fewer numbers than the answer scores 0, and numbers after them are not read.
    """
    expected = _NUMBER.findall(answer)
    found = _NUMBER.findall(response)[: len(expected)]
    return 1.0 if expected and found == expected else 0.0
