"""Staleness of trained samples: the trainer's version minus the version of each sample's oldest token."""

from __future__ import annotations

from megarl.rollout.sampling import WeightSegment
from megarl.trainer.batch import ScoredSample
from megarl.trainer.staleness import newest_version_mask, oldest_version, staleness_metrics, version_number


def scored(*segments: tuple[str, int, int], version: str | None = None) -> ScoredSample:
    tokens = segments[-1][2] if segments else 1
    return ScoredSample(
        prompt_ids=[1], response_ids=[3] * tokens, rollout_log_probs=[-1.0] * tokens, finish_reason="stop", group=0, score=1.0,
        weight_version=segments[-1][0] if segments else version, weight_segments=tuple(WeightSegment(*segment) for segment in segments),
    )


def test_version_labels():
    assert [version_number(label) for label in ("7", "0", "default", None, "nccl-1")] == [7, 0, 0, 0, 0]


def test_the_oldest_token_sets_the_staleness():
    assert oldest_version(scored(("3", 0, 2), ("5", 2, 4))) == 3
    assert oldest_version(scored(version="4")) == 4  # no segments reported: the sample's version
    assert oldest_version(scored(("default", 0, 3))) == 0


def test_metrics_count_every_staleness_up_to_the_maximum():
    samples = [scored(("5", 0, 2)), scored(("3", 0, 1), ("5", 1, 3)), scored(("5", 0, 4)), scored(("2", 0, 1))]
    assert staleness_metrics(samples, 5) == {
        "rollout/staleness_mean": 5 / 4,
        "rollout/staleness_max": 3,
        "rollout/staleness_0": 2,
        "rollout/staleness_1": 0,
        "rollout/staleness_2": 1,
        "rollout/staleness_3": 1,
    }


def test_synchronous_training_is_on_policy():
    # Step 0 trains on the launch weights, step s on the weights pushed after step s - 1.
    assert staleness_metrics([scored(("default", 0, 2))] * 3, 0) == {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0, "rollout/staleness_0": 3}
    assert staleness_metrics([scored(("4", 0, 2))] * 3, 4)["rollout/staleness_max"] == 0


def test_the_off_policy_mask_keeps_the_tokens_of_the_newest_weights_only():
    assert newest_version_mask(scored(("3", 0, 2), ("4", 2, 3), ("5", 3, 5))) == [False, False, False, True, True]
    assert newest_version_mask(scored(("5", 0, 3))) == [True, True, True]
    assert newest_version_mask(scored(version="4")) == [True]  # no segments: every token
