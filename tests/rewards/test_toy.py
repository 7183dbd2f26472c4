"""The toy tasks' verifier."""

from __future__ import annotations

import pytest

from megarl.rewards.toy import toy_reward

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("7", "7", 1.0),
        (" 7 <|im_end|>", "7", 1.0),
        ("answer is 7 .", "7", 1.0),
        ("3 7", "7", 0.0),
        ("", "7", 0.0),
        ("max the", "7", 0.0),
        ("17", "7", 0.0),
        ("7 8 9 9 9", "7", 1.0),
        # Answers of several numbers: the response's first ones, in order.
        ("1 8", "1 8", 1.0),
        (" 1 8 <|im_end|>", "1 8", 1.0),
        ("1 , 8 3", "1 8", 1.0),
        ("8 1", "1 8", 0.0),
        ("1", "1 8", 0.0),
        ("1 88", "1 8", 0.0),
        ("answer 1 is 8", "1 8", 1.0),
    ],
)
def test_first_numbers_decide(response, answer, expected):
    assert toy_reward(response, answer) == expected
