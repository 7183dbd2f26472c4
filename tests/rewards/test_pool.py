"""Reward isolation: raising, hanging, dying and slow functions leave the batch scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.rewards.functions import load_function, math_reward
from megarl.rewards.pool import RewardError, RewardPool

pytestmark = pytest.mark.cpu

FIXTURES = Path(__file__).with_name("fixtures_rewards.py")


def samples(*responses):
    return [{"prompt": "p", "response": r, "answer": "a"} for r in responses]


def pool(name, **kwargs):
    return RewardPool("function", f"{FIXTURES}:{name}", **{"num_workers": 2, "timeout_s": 2.0, **kwargs})


def test_scores_and_extra_metrics():
    with pool("good") as rewards:
        batch = rewards.score(samples("a", "b", "abc"))
    assert batch.scores == [1.0, 0.0, 0.0] and batch.failures == 0
    assert batch.extras == {"length": pytest.approx(5 / 3)}


def test_raising_function_scores_zero_and_is_counted():
    with pool("raises") as rewards:
        batch = rewards.score(samples("ok", "bad", "ok", "ok"))
    assert batch.scores == [1.0, 0.0, 1.0, 1.0] and batch.failures == 1
    assert "broken reward for 'bad'" in batch.first_error and batch.first_error.startswith("sample 1")


def test_hung_worker_is_killed_replaced_and_pool_recovers():
    with pool("hangs", timeout_s=1.0) as rewards:
        batch = rewards.score(samples("ok", "hang", "ok", "ok"))
        assert batch.scores == [1.0, 0.0, 1.0, 1.0]
        assert (batch.failures, batch.timeouts) == (1, 1)
        assert rewards.replaced == 1 and rewards.alive == 2
        assert rewards.score(samples("ok", "ok")).scores == [1.0, 1.0]


def test_dead_worker_is_replaced():
    with pool("dies") as rewards:
        batch = rewards.score(samples("ok", "die", "ok"))
        assert batch.scores == [1.0, 0.0, 1.0] and "worker died" in batch.first_error
        assert rewards.alive == 2


def test_slow_function_within_timeout_scores():
    with pool("slow", timeout_s=5.0) as rewards:
        batch = rewards.score(samples(*"abcd"))
    assert batch.scores == [0.5] * 4 and batch.failures == 0


def test_failure_rate_stops_with_the_first_error():
    with pool("raises", max_failure_rate=0.25) as rewards:
        with pytest.raises(RewardError, match="(?s)2 of 3 samples failed.*broken reward"):
            rewards.score(samples("bad", "ok", "bad"))


def test_wrong_return_type_is_a_failure():
    with pool("not_a_score", max_failure_rate=1.0) as rewards:
        batch = rewards.score(samples("a"))
    assert batch.scores == [0.0] and "must return a float" in batch.first_error


def test_unloadable_function_raises_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(AttributeError, match="has no function named 'nope'"):
        load_function(f"{FIXTURES}:nope")
    with pytest.raises(ValueError, match="path/to/file.py:function_name"):
        load_function("no_colon")
    with RewardPool("function", f"{FIXTURES}:nope", num_workers=1) as rewards:
        with pytest.raises(RewardError, match="loading reward"):
            rewards.score(samples("a"))


@pytest.mark.parametrize("response", ["0.5", "1/2", "\\frac{1}{2}", "so the answer is \\boxed{\\frac{1}{2}}", "x = 3, then 0.5"])
def test_math_accepts_equivalent_answers(response):
    assert math_reward("", response, "\\frac{1}{2}") == 1.0


@pytest.mark.parametrize("response", ["0.6", "\\boxed{2}", "no number here", "1/3"])
def test_math_rejects_wrong_answers(response):
    assert math_reward("", response, "0.5") == 0.0


def test_math_gsm8k_final_number():
    assert math_reward("", "She pays 3 * 4 = 12 dollars, so 1,200 cents.", "1200") == 1.0


def test_scorer_from_config():
    from megarl.config import load_config
    from megarl.rewards.remote import RemoteReward
    from megarl.rewards.scorer import build_scorer

    remote = build_scorer(load_config(None, ["reward.type=remote", "reward.url=http://127.0.0.1:1/x"]).reward)
    assert isinstance(remote, RemoteReward) and remote.url == "http://127.0.0.1:1/x"
    with build_scorer(load_config(None, ["reward.num_workers=1"]).reward) as toy:
        assert toy.score([{"prompt": "max 1 2 3", "response": "3", "answer": "3"}]).scores == [1.0]
