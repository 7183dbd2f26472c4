"""The bundled toy tasks' verifier (``megarl/assets/data/toy``)."""

from __future__ import annotations

import re

_FIRST_NUMBER = re.compile(r"-?\d+")


def toy_reward(response: str, answer: str) -> float:
    """1.0 when the first number in ``response`` equals ``answer``, else 0.0.

    The response may carry anything around the number (words, the end-of-turn token, a cut-off
    tail); only the first run of digits counts, so a response without digits scores 0. Every toy
    answer is a single digit.
    """
    match = _FIRST_NUMBER.search(response)
    return 1.0 if match is not None and match.group() == answer.strip() else 0.0
