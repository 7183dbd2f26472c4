"""The scorers a run chooses between: the isolated worker pool and the in-process scorer give the
same results for the same functions (every case here runs against both), and ``build_scorer``
picks one from ``reward.isolation``. What only the pool can do (timeouts, dead workers) is in
``test_pool.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.config import ConfigError, RewardConfig, load_config
from megarl.rewards.inline import InlineScorer
from megarl.rewards.pool import RewardError, RewardPool, as_score
from megarl.rewards.remote import RemoteReward
from megarl.rewards.scorer import build_scorer

pytestmark = pytest.mark.cpu

FIXTURES = Path(__file__).with_name("fixtures_rewards.py")
SCORER_OF_ISOLATION = {"process": RewardPool, "none": InlineScorer}


@pytest.fixture(params=sorted(SCORER_OF_ISOLATION))
def scorer(request):
    """``scorer(name, **reward_settings)``: the scorer of the fixtures' function ``name`` that
    ``build_scorer`` gives with ``reward.isolation`` = the parameter."""

    def build(name: str, **settings):
        config = RewardConfig(type="function", function=f"{FIXTURES}:{name}", isolation=request.param, num_workers=2, timeout_s=2.0, **settings)
        built = build_scorer(config)
        assert type(built) is SCORER_OF_ISOLATION[request.param]
        return built

    return build


def samples(*responses):
    return [{"prompt": "p", "response": r, "answer": "a"} for r in responses]


def verl_samples(*pairs):
    """(response, answer) pairs as a verl dataset gives them: data_source and extra_info row fields."""
    return [
        {"prompt": "p", "response": response, "answer": answer, "data_source": "toy", "extra_info": {"index": index}}
        for index, (response, answer) in enumerate(pairs)
    ]


def test_scores_and_extra_metrics(scorer):
    with scorer("good") as rewards:
        batch = rewards.score(samples("a", "b", "abc"))
    assert batch.scores == [1.0, 0.0, 0.0] and batch.failures == 0
    assert batch.extras == {"length": pytest.approx(5 / 3)}
    # Each sample's own, in input order (the generation files record them).
    assert batch.sample_extras == [{"length": 1.0}, {"length": 1.0}, {"length": 3.0}]


def test_scores_keep_input_order_and_the_lowest_failure_is_reported(scorer):
    # In the pool, sample 0 (paused) finishes after sample 3 has failed.
    rows = [{"prompt": "p", "response": response, "answer": "a", "pause_s": 0.3 if index == 0 else 0.0} for index, response in enumerate(["bad0", "1", "2", "bad3", "4", "5"])]
    with scorer("numbered") as rewards:
        batch = rewards.score(rows)
    assert batch.scores == [0.0, 1.0, 2.0, 0.0, 4.0, 5.0] and (batch.failures, batch.timeouts) == (2, 0)
    assert batch.first_failed == 0 and batch.first_error.startswith("sample 0: ") and "broken reward for 'bad0'" in batch.first_error


def test_raising_function_scores_zero_and_is_counted(scorer):
    with scorer("raises") as rewards:
        batch = rewards.score(samples("ok", "bad", "ok", "ok"))
    assert batch.scores == [1.0, 0.0, 1.0, 1.0] and batch.failures == 1
    assert "broken reward for 'bad'" in batch.first_error and batch.first_error.startswith("sample 1")
    assert "Traceback (most recent call last)" in batch.first_error


def test_failure_rate_stops_with_the_first_error(scorer):
    with scorer("raises", max_failure_rate=0.25) as rewards:
        with pytest.raises(RewardError, match="(?s)2 of 3 samples failed.*broken reward"):
            rewards.score(samples("bad", "ok", "bad"))
        # The scorer is still usable after a batch that stopped the run.
        assert rewards.score(samples("ok")).scores == [1.0]


def test_wrong_return_type_is_a_failure(scorer):
    with scorer("not_a_score", max_failure_rate=1.0) as rewards:
        batch = rewards.score(samples("a"))
    assert batch.scores == [0.0] and "must return a float" in batch.first_error


def test_non_finite_scores_are_failures_scored_zero(scorer):
    with scorer("nan_for_bad", max_failure_rate=1.0) as rewards:
        batch = rewards.score(samples("ok", "bad", "inf", "-inf", "ok"))
    assert batch.scores == [1.0, 0.0, 0.0, 0.0, 1.0] and batch.failures == 3
    assert (batch.first_failed, batch.first_error) == (1, "sample 1: the score is nan: a reward must be a finite number")
    assert as_score({"score": 2, "length": 3}) == (2.0, {"length": 3.0})
    for value in (float("nan"), {"score": float("inf")}, {"score": "1"}, True):
        with pytest.raises((TypeError, ValueError)):
            as_score(value)


def test_a_function_that_fails_to_load_raises_when_scoring(scorer):
    # Building does not raise (the pool's workers load in the background): the first score does.
    with scorer("nope") as rewards:
        with pytest.raises(RewardError, match=r"(?s)loading reward function:.*fixtures_rewards.py:nope failed:\n.*has no function named 'nope'"):
            rewards.score(samples("a"))


def test_verl_signatures_work_unchanged(scorer):
    with scorer("compute_score") as rewards:
        batch = rewards.score(verl_samples(("4", "4"), ("5", "4")))
    assert batch.scores == [1.0, 0.0] and batch.extras == {"source_is_toy": 1.0, "has_extra": 1.0}
    with scorer("verl_without_extra_info") as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"))).scores == [1.0, 0.0]
    with scorer("verl_batched", batched=True) as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"), ("6", "6"))).scores == [1.0, 0.0, 1.0]


def test_each_function_gets_only_the_arguments_it_takes(scorer):
    with scorer("no_row") as rewards:
        batch = rewards.score(verl_samples(("4", "4"), ("5", "4")))
    assert batch.scores == [1.0, 0.0] and batch.failures == 0
    with scorer("verl_with_text_extras") as rewards:
        batch = rewards.score(verl_samples(("4", "4")))
    assert batch.scores == [1.0] and batch.extras == {"acc": 1.0}
    with scorer("batched_numpy", batched=True) as rewards:
        assert rewards.score(verl_samples(("4", "4"), ("5", "4"), ("6", "6"))).scores == [0.5, 0.5, 0.5]


def test_a_batched_function_scores_lists(scorer):
    rows = [{"prompt": "p", "response": r, "answer": "a", "level": level} for r, level in [("a", "easy"), ("b", "hard"), ("a", "hard"), ("c", "easy"), ("a", "easy")]]
    with scorer("batched", batched=True) as rewards:
        batch = rewards.score(rows)
    assert batch.scores == [1.0, 0.5, 1.5, 0.0, 1.0] and batch.failures == 0
    # The pool gives each of its 2 workers a call of 3 and 2 samples; in process it is one call of 5.
    expected_call = {RewardPool: 3, InlineScorer: 5}[type(rewards)]
    with scorer("batched_wrong_length", batched=True, max_failure_rate=1.0) as rewards:
        batch = rewards.score(rows)
    assert batch.scores == [0.0] * 5 and batch.failures == 5
    assert f"must return a list of {expected_call} scores; got 1 values" in batch.first_error


def test_isolation_auto_runs_only_the_toy_rule_in_process():
    def resolved(*overrides):
        return load_config(None, list(overrides)).reward.resolved_isolation()

    assert resolved() == "none"
    assert resolved("reward.rule=math") == "process"
    assert resolved("reward.type=function", f"reward.function={FIXTURES}:good") == "process"
    assert resolved("reward.type=model", "reward.model_path=some/dir") == "process"
    assert resolved("reward.isolation=process") == "process"
    assert resolved("reward.rule=math", "reward.isolation=none") == "none"
    assert resolved("reward.type=function", f"reward.function={FIXTURES}:good", "reward.isolation=none") == "none"


def test_scorer_from_config():
    remote = build_scorer(load_config(None, ["reward.type=remote", "reward.url=http://127.0.0.1:1/x"]).reward)
    assert isinstance(remote, RemoteReward) and remote.url == "http://127.0.0.1:1/x"
    toy_sample = [{"prompt": "max 1 2 3", "response": "3", "answer": "3"}]
    with build_scorer(load_config(None, ["reward.num_workers=1"]).reward) as toy:
        assert isinstance(toy, InlineScorer) and toy.score(toy_sample).scores == [1.0]
    with build_scorer(load_config(None, ["reward.num_workers=1", "reward.isolation=process"]).reward) as toy:
        assert isinstance(toy, RewardPool) and toy.score(toy_sample).scores == [1.0]


def test_a_remote_reward_refuses_isolation_none():
    remote = ["reward.type=remote", "reward.url=http://127.0.0.1:1/x"]
    with pytest.raises(ConfigError) as error:
        load_config(None, [*remote, "reward.isolation=none"])
    assert str(error.value) == (
        "override `reward.isolation=none`: `reward.isolation` (none) does not apply to reward.type 'remote': "
        "the service at reward.url scores, not this process; remove it"
    )
    assert load_config(None, [*remote, "reward.isolation=process"]).reward.isolation == "process"
