"""The async rollout buffer: AReaL's capacity rule, the staleness bound at the take, places given
back, holds, failures and closing, with threads where the buffer is shared between them."""

from __future__ import annotations

import threading

import pytest

from megarl.rollout.buffer import BufferClosed, BufferedGroup, RolloutBuffer

pytestmark = pytest.mark.cpu

B = 8
"""Samples per train batch in these tests; groups of 4, rounds of 8."""


def group(oldest_version: int, position: int = 0, size: int = 4) -> BufferedGroup:
    return BufferedGroup(samples=[f"s{position}.{index}" for index in range(size)], oldest_version=oldest_version, prompt_position=position)


def admitted_rounds(buffer: RolloutBuffer, round_samples: int = B) -> int:
    """Rounds admitted at once without waiting."""
    rounds = 0
    while buffer.admit(round_samples, timeout_s=0):
        rounds += 1
    return rounds


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_admission_runs_ahead_by_the_bound_and_moves_on_with_each_version(max_staleness):
    buffer = RolloutBuffer(B, max_staleness)
    # (v + K + 1) B samples at version v: K batches ahead of the one being trained.
    assert admitted_rounds(buffer) == max_staleness + 1
    buffer.set_version(1)
    assert admitted_rounds(buffer) == 1
    # A resumed run counts the batches before its first step as admitted already.
    resumed = RolloutBuffer(B, max_staleness, version=5)
    assert resumed.admitted == 5 * B and admitted_rounds(resumed) == max_staleness + 1


def test_places_given_back_never_leave_the_trainer_waiting():
    buffer = RolloutBuffer(B, 0)
    assert admitted_rounds(buffer) == 1
    # A filter drops half of batch 0: the trainer needs 4 more samples, and a whole round starts
    # although it reaches past (v + K + 1) B.
    buffer.release(4)
    assert buffer.admit(B, timeout_s=0)
    assert not buffer.admit(B, timeout_s=0)
    # Given back within the batches already covered: nothing more starts.
    buffer = RolloutBuffer(B, 1)
    assert admitted_rounds(buffer) == 2
    buffer.release(4)
    assert not buffer.admit(B, timeout_s=0)


def test_the_run_admits_nothing_past_its_last_batch():
    buffer = RolloutBuffer(B, 3, total_samples=2 * B)
    assert admitted_rounds(buffer) == 2
    buffer.release(B)  # the places of a dropped round are needed again
    assert admitted_rounds(buffer) == 1


def test_a_group_past_the_bound_is_dropped_counted_and_handed_back():
    buffer = RolloutBuffer(B, 1, version=3)
    buffer.admit(B)
    buffer.put([group(1, position=10), group(2, position=11), group(3, position=12)])
    assert buffer.take().prompt_position == 11  # 3 - 1 > 1: the first is dropped
    assert buffer.admitted == 3 * B + B - 4  # ... and gives its place back
    assert buffer.take().prompt_position == 12
    dropped, samples = buffer.drain_dropped()
    assert [entry.prompt_position for entry in dropped] == [10] and samples == 4
    assert buffer.drain_dropped() == ([], 0)


def test_holding_stops_admission_until_released():
    buffer = RolloutBuffer(B, 1)
    buffer.hold(True)
    assert not buffer.admit(B, timeout_s=0)
    buffer.hold(False)
    assert buffer.admit(B, timeout_s=0)


def test_waiters_wake_for_a_new_version_a_group_a_failure_and_the_close():
    buffer = RolloutBuffer(B, 0)
    assert admitted_rounds(buffer) == 1
    outcomes = {}

    def wait(name, call):
        try:
            outcomes[name] = call()
        except BaseException as error:  # noqa: BLE001 - recorded for the assertions
            outcomes[name] = type(error).__name__

    producer = threading.Thread(target=wait, args=("admit", lambda: buffer.admit(B)))
    trainer = threading.Thread(target=wait, args=("take", lambda: buffer.take().prompt_position))
    producer.start()
    trainer.start()
    buffer.set_version(1)
    buffer.put([group(1, position=7)])
    producer.join(10)
    trainer.join(10)
    assert outcomes == {"admit": True, "take": 7}

    failing = threading.Thread(target=wait, args=("failed", buffer.take))
    failing.start()
    buffer.fail(ValueError("engine gone"))
    failing.join(10)
    assert outcomes["failed"] == "ValueError"

    closed = RolloutBuffer(B, 0)
    closed.admit(B)
    waiters = [threading.Thread(target=wait, args=(name, call)) for name, call in [("closed_admit", lambda: closed.admit(B)), ("closed_take", closed.take)]]
    for waiter in waiters:
        waiter.start()
    closed.close()
    for waiter in waiters:
        waiter.join(10)
    assert outcomes["closed_admit"] == outcomes["closed_take"] == "BufferClosed"
    with pytest.raises(BufferClosed):
        closed.admit(B)
