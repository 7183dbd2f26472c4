"""A user reward function that fails on some samples (for tests/test_train.py): it raises on every
response that contains the digit 3 and scores the others with the toy verifier, with the response's
length in characters as an extra number."""

from megarl.rewards.toy import toy_reward


def reward(prompt: str, response: str, answer: str, **row) -> dict[str, float]:
    if "3" in response:
        raise RuntimeError("flaky reward: refuses responses with a 3")
    return {"score": toy_reward(response, answer), "characters": float(len(response))}
