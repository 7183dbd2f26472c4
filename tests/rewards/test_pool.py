"""Reward isolation: raising, hanging, dying and slow functions leave the batch scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.rewards.functions import RewardFunctionError, calling_convention, load_function, math_reward
from megarl.rewards.pool import RewardError, RewardPool, as_score

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
    with pytest.raises(RewardFunctionError, match="missing.py does not exist$"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(RewardFunctionError, match=r"has no function named 'nope' \(it defines \[.*'good'.*\]\)"):
        load_function(f"{FIXTURES}:nope")
    with pytest.raises(RewardFunctionError, match="path/to/file.py:function_name"):
        load_function("no_colon")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompt, response, answer):\n    return (1.0\n")
    with pytest.raises(RewardFunctionError, match=rf"{broken}:2: syntax error"):
        load_function(f"{broken}:f")
    failing = tmp_path / "failing.py"
    failing.write_text("import no_such_package\n")
    with pytest.raises(RewardFunctionError, match=rf"importing {failing} failed: ModuleNotFoundError: No module named 'no_such_package'"):
        load_function(f"{failing}:f")
    with RewardPool("function", f"{FIXTURES}:nope", num_workers=1) as rewards:
        with pytest.raises(RewardError, match="loading reward"):
            rewards.score(samples("a"))


def test_non_finite_scores_are_failures_scored_zero():
    with pool("nan_for_bad", max_failure_rate=1.0) as rewards:
        batch = rewards.score(samples("ok", "bad", "inf", "-inf", "ok"))
    assert batch.scores == [1.0, 0.0, 0.0, 0.0, 1.0] and batch.failures == 3
    assert (batch.first_failed, batch.first_error) == (1, "sample 1: the score is nan: a reward must be a finite number")
    assert as_score({"score": 2, "length": 3}) == (2.0, {"length": 3.0})
    for value in (float("nan"), {"score": float("inf")}, {"score": "1"}, True):
        with pytest.raises((TypeError, ValueError)):
            as_score(value)


def verl_samples(*pairs):
    """(response, answer) pairs as a verl dataset gives them: data_source and extra_info row fields."""
    return [
        {"prompt": "p", "response": response, "answer": answer, "data_source": "toy", "extra_info": {"index": index}}
        for index, (response, answer) in enumerate(pairs)
    ]


def test_verl_signatures_work_unchanged():
    with pool("compute_score") as rewards:
        batch = rewards.score(verl_samples(("4", "4"), ("5", "4")))
    assert batch.scores == [1.0, 0.0] and batch.extras == {"source_is_toy": 1.0, "has_extra": 1.0}
    with pool("verl_without_extra_info") as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"))).scores == [1.0, 0.0]
    with pool("verl_batched", batched=True) as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"), ("6", "6"))).scores == [1.0, 0.0, 1.0]


def test_each_function_gets_only_the_arguments_it_takes():
    with pool("no_row") as rewards:
        batch = rewards.score(verl_samples(("4", "4"), ("5", "4")))
    assert batch.scores == [1.0, 0.0] and batch.failures == 0
    with pool("verl_with_text_extras") as rewards:
        batch = rewards.score(verl_samples(("4", "4")))
    assert batch.scores == [1.0] and batch.extras == {"acc": 1.0}
    with pool("batched_numpy", batched=True) as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"), ("6", "6"))).scores == [0.5, 0.5, 0.5]


def test_a_reward_file_with_dataclasses_loads(tmp_path):
    path = tmp_path / "typed.py"
    path.write_text(
        "from __future__ import annotations\nimport dataclasses\n\n@dataclasses.dataclass\nclass Verdict:\n    score: float\n\n"
        "def reward(prompt, response, answer, **row):\n    return Verdict(1.0).score\n"
    )
    assert load_function(f"{path}:reward")("p", "r", "a") == 1.0


def test_a_batched_function_scores_lists_split_over_the_workers():
    rows = [{"prompt": "p", "response": r, "answer": "a", "level": level} for r, level in [("a", "easy"), ("b", "hard"), ("a", "hard"), ("c", "easy"), ("a", "easy")]]
    with pool("batched", batched=True) as rewards:
        batch = rewards.score(rows)
    assert batch.scores == [1.0, 0.5, 1.5, 0.0, 1.0] and batch.failures == 0
    with pool("batched_wrong_length", batched=True, max_failure_rate=1.0) as rewards:
        batch = rewards.score(rows)
    assert batch.scores == [0.0] * 5 and batch.failures == 5 and "must return a list of 3 scores; got 1 values" in batch.first_error


def test_a_signature_that_fits_neither_convention_is_refused_with_the_fix():
    def check(name, batched=False):
        spec = f"{FIXTURES}:{name}"
        return calling_convention(load_function(spec), spec, batched)

    assert (check("good"), check("compute_score"), check("batched", batched=True), check("verl_batched", batched=True)) == ("megarl", "verl", "megarl", "verl")
    with pytest.raises(RewardFunctionError, match=r"two_arguments\(x, y\) takes neither megarl's arguments \(prompt, response, answer, \*\*row\) nor verl's"):
        check("two_arguments")
    with pytest.raises(RewardFunctionError, match="set reward.batched=true"):
        check("verl_batched")
    with pytest.raises(RewardFunctionError, match="set reward.batched=false"):
        check("compute_score", batched=True)


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
