"""Reward isolation: hanging, dying and slow functions leave the batch scored; loading reward
functions and the math rule. What the pool shares with the in-process scorer is in ``test_scorer.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.rewards.functions import RewardFunctionError, calling_convention, load_function, math_reward
from megarl.rewards.pool import RewardPool

pytestmark = pytest.mark.cpu

FIXTURES = Path(__file__).with_name("fixtures_rewards.py")


def samples(*responses):
    return [{"prompt": "p", "response": r, "answer": "a"} for r in responses]


def pool(name, **kwargs):
    return RewardPool("function", f"{FIXTURES}:{name}", **{"num_workers": 2, "timeout_s": 2.0, **kwargs})


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


def test_a_reward_file_with_dataclasses_loads(tmp_path):
    path = tmp_path / "typed.py"
    path.write_text(
        "from __future__ import annotations\nimport dataclasses\n\n@dataclasses.dataclass\nclass Verdict:\n    score: float\n\n"
        "def reward(prompt, response, answer, **row):\n    return Verdict(1.0).score\n"
    )
    assert load_function(f"{path}:reward")("p", "r", "a") == 1.0


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
