"""A user reward function that fails on some samples (for tests/test_train.py): it raises on every
response that contains the digit 3 and scores the others with the toy verifier."""

from megarl.rewards.toy import toy_reward


def reward(prompt: str, response: str, answer: str, **row) -> float:
    if "3" in response:
        raise RuntimeError("flaky reward: refuses responses with a 3")
    return toy_reward(response, answer)
