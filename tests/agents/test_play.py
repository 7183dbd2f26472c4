"""A round of episodes played by an agent program (megarl.agents.play.play_programs), with the
chat endpoint and the program workers stood in for."""

from __future__ import annotations

import pytest

from megarl.agents.episode import Trajectory
from megarl.agents.play import play_programs
from megarl.agents.programs import ProgramOutcome
from megarl.data.datasets import Prompt
from megarl.rollout.errors import EngineDead
from megarl.rollout.sampling import SamplingParams

pytestmark = pytest.mark.cpu

PROMPTS = [Prompt(prompt_ids=[1, 2], text="a", answer="1", metadata={}, source="t:1"), Prompt(prompt_ids=[1, 3], text="b", answer="2", metadata={}, source="t:2")]


class FakeEndpoint:
    def __init__(self, recorded, engine_failure=None):
        self.recorded, self.engine_failure, self.opened = recorded, engine_failure, []

    def open_episode(self, episode_id, route, seed, sampling=None):
        self.opened.append((episode_id, route))
        return f"http://endpoint/episodes/{episode_id}/v1"

    def trajectory(self, episode_id):
        trajectory = self.recorded.get(episode_id)
        if trajectory is None:
            raise ValueError(f"episode {episode_id!r} has no answered call")
        return trajectory


class FakePrograms:
    def __init__(self, outcomes):
        self.outcomes, self.episodes = outcomes, []

    def play(self, episodes, *, on_timeout):
        self.episodes = episodes
        return [self.outcomes[episode.episode_id] for episode in episodes]


def test_outcomes_become_the_episodes_rewards_and_failures():
    played = Trajectory(prompt_ids=[1, 2], response_ids=[5, 2], loss_mask=[True, True], turns=1)
    at_limit = Trajectory(prompt_ids=[1, 2], response_ids=[5], loss_mask=[True], turns=2, max_turns_reached=True)
    recorded = {"r/0/0": played, "r/0/1": at_limit, "r/1/1": Trajectory(prompt_ids=[1, 3], response_ids=[7], loss_mask=[True], turns=1)}
    outcomes = {
        "r/0/0": ProgramOutcome(reward=1.0),
        "r/0/1": ProgramOutcome(failure="error", message="400: max turns"),  # stopped on the endpoint's refusal
        "r/1/0": ProgramOutcome(reward=0.5),  # returned without a single answered call
        "r/1/1": ProgramOutcome(failure="timeout", message="still running after 1 s"),
    }
    endpoint, programs = FakeEndpoint(recorded), FakePrograms(outcomes)
    trajectories = play_programs(endpoint, programs, PROMPTS, SamplingParams(max_new_tokens=4, seed=3), samples_per_prompt=2, label="r")
    assert [route for _, route in endpoint.opened] == [0, 0, 1, 1]
    assert [episode.row["prompt"] for episode in programs.episodes] == ["a", "a", "b", "b"]
    assert [(trajectory.reward, trajectory.failure) for trajectory in trajectories] == [(1.0, None), (None, None), (None, "error"), (None, "timeout")]
    assert trajectories[2].prompt_ids == [1, 3] and trajectories[2].response_ids == []


def test_an_engine_that_failed_for_good_stops_the_round_as_in_the_built_in_loop():
    endpoint = FakeEndpoint({}, engine_failure=EngineDead("hf-0", "connection refused"))
    programs = FakePrograms({f"r/{index}/0": ProgramOutcome(failure="error", message="500") for index in range(2)})
    with pytest.raises(EngineDead):
        play_programs(endpoint, programs, PROMPTS, SamplingParams(max_new_tokens=4), samples_per_prompt=1, label="r")
