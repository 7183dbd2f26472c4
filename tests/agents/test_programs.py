"""Agent programs in worker processes (megarl.agents.programs): rewards come back, many episodes
run at once, and a program that raises, returns nonsense, hangs or kills its process fails its
episode only; programs that cannot be loaded are refused at start-up with one line."""

from __future__ import annotations

import math
import time

import pytest

from megarl.agents.environment import EnvironmentLoadError
from megarl.agents.programs import ProgramEpisode, ProgramPool, checked_reward, load_agent_program

pytestmark = pytest.mark.cpu

PROGRAM = """
import os
import time


def play(base_url, row):
    time.sleep(row.get("sleep", 0.0))
    mode = row["mode"]
    if mode == "raise":
        raise ValueError("no tool for " + base_url)
    if mode == "exit":
        os._exit(3)
    return {"reward": row.get("reward"), "none": None, "nan": float("nan"), "text": "1.0", "flag": True}[mode]


def no_row(base_url):
    return 1.0
"""


def episodes(*rows: dict) -> list[ProgramEpisode]:
    return [ProgramEpisode(f"e{index}", f"http://episode/{index}/v1", row) for index, row in enumerate(rows)]


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("programs") / "agent.py"
    path.write_text(PROGRAM)
    return path


@pytest.fixture(scope="module")
def pool(program_file):
    with ProgramPool(f"{program_file}:play", num_workers=2, episode_timeout_s=0.5) as pool:
        yield pool


def test_rewards_come_back_in_order_and_episodes_run_at_once(pool):
    start = time.monotonic()
    outcomes = pool.play(episodes(*({"mode": "reward", "reward": index, "sleep": 0.2} for index in range(12)), {"mode": "none"}))
    # Twelve episodes of 0.2 s on two workers: on threads, not one after another (1.2 s a worker).
    assert time.monotonic() - start < 0.8
    assert [outcome.reward for outcome in outcomes] == [*map(float, range(12)), None]
    assert all(outcome.failure is None for outcome in outcomes)


def test_a_program_that_raises_or_returns_no_finite_number_fails_its_episode_only(pool):
    outcomes = pool.play(episodes({"mode": "raise"}, {"mode": "nan"}, {"mode": "text"}, {"mode": "flag"}, {"mode": "reward", "reward": 0.5}))
    assert [outcome.failure for outcome in outcomes] == ["error", "error", "error", "error", None]
    assert "play raised ValueError: no tool for http://episode/0/v1" in outcomes[0].message
    assert "finite" in outcomes[1].message and "returned a str" in outcomes[2].message and "returned a bool" in outcomes[3].message
    assert outcomes[4].reward == 0.5


def test_a_program_over_the_timeout_fails_is_reported_at_once_and_its_worker_is_replaced(pool):
    replaced, timed_out = pool.replaced, []
    outcomes = pool.play(episodes({"mode": "none", "sleep": 30.0}, {"mode": "reward", "reward": 1.0}), on_timeout=timed_out.append)
    assert [outcome.failure for outcome in outcomes] == ["timeout", None]
    assert "agent.episode_timeout_s (0.5 s)" in outcomes[0].message and timed_out == ["e0"]
    # The stuck program's thread cannot be stopped: its worker was replaced; the pool goes on.
    assert pool.replaced == replaced + 1
    assert [outcome.reward for outcome in pool.play(episodes(*({"mode": "reward", "reward": 2.0} for _ in range(4))))] == [2.0] * 4


def test_a_worker_that_dies_fails_its_episodes_and_is_replaced(pool):
    replaced = pool.replaced
    # Episodes 0 and 2 share worker 0, which the first kills; worker 1's episode is untouched.
    outcomes = pool.play(episodes({"mode": "exit"}, {"mode": "reward", "reward": 1.0}, {"mode": "reward", "reward": 1.0, "sleep": 0.2}))
    assert [outcome.failure for outcome in outcomes] == ["died", None, "died"]
    assert "exit code 3" in outcomes[0].message
    assert pool.replaced == replaced + 1 and pool.alive == 2
    assert [outcome.reward for outcome in pool.play(episodes({"mode": "reward", "reward": 3.0}, {"mode": "none"}))] == [3.0, None]


def test_a_replacements_start_up_is_not_counted_against_its_episodes(tmp_path):
    # The program takes 1 s to import, twice the episode timeout: a replacement worker's episodes
    # are timed from when it is ready, not from when the round started.
    slow = tmp_path / "slow_agent.py"
    slow.write_text(PROGRAM + "\ntime.sleep(1.0)\n")
    with ProgramPool(f"{slow}:play", num_workers=1, episode_timeout_s=0.5) as slow_pool:
        outcomes = slow_pool.play(episodes({"mode": "exit"}))
        assert [outcome.failure for outcome in outcomes] == ["died"] and slow_pool.replaced == 1
        start = time.monotonic()
        outcomes = slow_pool.play(episodes({"mode": "reward", "reward": 4.0}, {"mode": "reward", "reward": 5.0}))
        assert [(outcome.failure, outcome.reward) for outcome in outcomes] == [(None, 4.0), (None, 5.0)]
        assert time.monotonic() - start >= 1.0  # the replacement was still importing when the round began


def test_close_stops_every_worker(program_file):
    pool = ProgramPool(f"{program_file}:play", num_workers=1, episode_timeout_s=1.0)
    pool.close()
    assert pool.alive == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.play(episodes({"mode": "none"}))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("agent.py", "is not path/to/agent.py:function"),
        ("missing.py:play", "missing.py does not exist"),
        ("{file}:nothing", "has no function named 'nothing' (it defines ['no_row', 'play'])"),
        ("{file}:no_row", "no_row(base_url) cannot be called as no_row(base_url, row)"),
        ("{broken}:play", "syntax error"),
    ],
)
def test_a_program_that_cannot_be_loaded_is_refused_with_one_line(program_file, spec, message):
    broken = program_file.with_name("broken.py")
    broken.write_text("def play(base_url, row):\n    return (\n")
    spec = spec.format(file=program_file, broken=broken)
    with pytest.raises(EnvironmentLoadError, match="agent.openai_agent = ") as refused:
        load_agent_program(spec)
    assert message in str(refused.value)


def test_the_pool_refuses_a_program_that_cannot_be_loaded_when_it_starts(program_file):
    with pytest.raises(EnvironmentLoadError, match=r"no_row\(base_url\) cannot be called as no_row\(base_url, row\)"):
        ProgramPool(f"{program_file}:no_row", num_workers=1)


def test_checked_reward_takes_finite_numbers_and_none():
    assert checked_reward(1) == 1.0 and checked_reward(None) is None
    for value in (math.inf, True, "1", [1.0]):
        with pytest.raises(ValueError, match="returned"):
            checked_reward(value)
