"""The async rollout buffer: AReaL's capacity rule, the staleness bound at the take, places given
back, holds, failures and closing, with threads where the buffer is shared between them."""

from __future__ import annotations

import threading

import pytest

from megarl.rollout.buffer import BufferClosed, BufferedGroup, RolloutBuffer

pytestmark = pytest.mark.cpu

B = 8
"""Samples per train batch in these tests; groups of 4, rounds of 8."""
GROUP = 4


def group(oldest_version: int, position: int = 0, size: int = 4) -> BufferedGroup:
    return BufferedGroup(samples=[f"s{position}.{index}" for index in range(size)], oldest_version=oldest_version, prompt_position=position)


def admitted_rounds(buffer: RolloutBuffer, round_samples: int = B) -> list[int]:
    """The samples of each round admitted at once, without waiting."""
    rounds = []
    while granted := buffer.admit(round_samples, group=GROUP, timeout_s=0):
        rounds.append(granted)
    return rounds


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_admission_runs_ahead_by_the_bound_and_moves_on_with_each_version(max_staleness):
    buffer = RolloutBuffer(B, max_staleness)
    # (v + K + 1) B samples at version v: K batches ahead of the one being trained.
    assert admitted_rounds(buffer) == [B] * (max_staleness + 1)
    buffer.set_version(1)
    assert admitted_rounds(buffer) == [B]
    # A resumed run counts the batches before its first step as admitted already.
    resumed = RolloutBuffer(B, max_staleness, version=5)
    assert resumed.admitted == 5 * B and admitted_rounds(resumed) == [B] * (max_staleness + 1)


def test_a_round_is_cut_to_the_groups_that_fit_under_the_bound():
    buffer = RolloutBuffer(3 * GROUP, 0)
    assert admitted_rounds(buffer, round_samples=2 * GROUP) == [2 * GROUP, GROUP]


def test_places_given_back_never_leave_the_trainer_waiting():
    buffer = RolloutBuffer(B, 0)
    assert admitted_rounds(buffer) == [B]
    # A filter drops a group of batch 0: the trainer needs 4 more samples, and the group that
    # covers them starts.
    buffer.release(GROUP)
    assert admitted_rounds(buffer) == [GROUP]
    # Given back within the batches already covered, under the bound: what fits starts.
    buffer = RolloutBuffer(B, 1)
    assert admitted_rounds(buffer) == [B, B]
    buffer.release(GROUP)
    assert admitted_rounds(buffer) == [GROUP]


def test_the_run_admits_nothing_past_its_last_batch():
    buffer = RolloutBuffer(B, 3, total_samples=2 * B)
    assert admitted_rounds(buffer) == [B, B]
    buffer.release(B)  # the places of a dropped round are needed again
    assert admitted_rounds(buffer) == [B]


def test_a_group_past_the_bound_is_dropped_counted_and_handed_back():
    buffer = RolloutBuffer(B, 1, version=3)
    buffer.admit(B, group=GROUP)
    buffer.put([group(1, position=10), group(2, position=11), group(3, position=12)])
    assert buffer.take().prompt_position == 11  # 3 - 1 > 1: the first is dropped
    assert buffer.admitted == 3 * B + B - 4  # ... and gives its place back
    assert buffer.take().prompt_position == 12
    assert [entry.prompt_position for entry in buffer.drain_dropped()] == [10]
    assert buffer.drain_dropped() == []


def test_holding_stops_admission_until_released():
    buffer = RolloutBuffer(B, 1)
    buffer.hold(True)
    assert buffer.admit(B, group=GROUP, timeout_s=0) == 0
    buffer.hold(False)
    assert buffer.admit(B, group=GROUP, timeout_s=0) == B


def test_waiters_wake_for_a_new_version_a_group_a_failure_and_the_close():
    buffer = RolloutBuffer(B, 0)
    assert admitted_rounds(buffer) == [B]
    outcomes = {}

    def wait(name, call):
        try:
            outcomes[name] = call()
        except BaseException as error:  # noqa: BLE001 - recorded for the assertions
            outcomes[name] = type(error).__name__

    producer = threading.Thread(target=wait, args=("admit", lambda: buffer.admit(B, group=GROUP)))
    trainer = threading.Thread(target=wait, args=("take", lambda: buffer.take().prompt_position))
    producer.start()
    trainer.start()
    buffer.set_version(1)
    buffer.put([group(1, position=7)])
    producer.join(10)
    trainer.join(10)
    assert outcomes == {"admit": B, "take": 7}

    failing = threading.Thread(target=wait, args=("failed", buffer.take))
    failing.start()
    buffer.fail(ValueError("engine gone"))
    failing.join(10)
    assert outcomes["failed"] == "ValueError"

    closed = RolloutBuffer(B, 0)
    closed.admit(B, group=GROUP)
    waiters = [threading.Thread(target=wait, args=(name, call)) for name, call in [("closed_admit", lambda: closed.admit(B, group=GROUP)), ("closed_take", closed.take)]]
    for waiter in waiters:
        waiter.start()
    closed.close()
    for waiter in waiters:
        waiter.join(10)
    assert outcomes["closed_admit"] == outcomes["closed_take"] == "BufferClosed"
    with pytest.raises(BufferClosed):
        closed.admit(B, group=GROUP)
