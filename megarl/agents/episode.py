"""One multi-turn episode over the engines: the model's turns and the environment's observations
become one token-exact trajectory.

::

    prompt ids ──► engine turn 1 ──► env.step(text) ──► observation ids ──► engine turn 2 ──► ...

The trajectory is built from token ids only: each model turn is the ids (and log-probs) the engine
returned, appended as they are; each observation is the environment's messages rendered by the
chat template after the model's end-of-turn token (:func:`megarl.agents.rendering.observation_ids`)
and appended; the next turn continues exactly that sequence. Nothing the model produced is ever
decoded and encoded again, so the trainer scores the very tokens that were sampled. The text of a
turn (decoded, special tokens skipped) goes only to the environment and the reward.

The loss mask is 1 on model tokens and 0 on observation tokens; observation tokens carry log-prob
0 (never read: they are masked). A turn's weight version segments are kept, shifted to where the
turn sits in the trajectory, so a trajectory whose turns span a weight update says which weights
sampled which turn (:mod:`megarl.trainer.staleness` reads them; observation tokens have none).

Limits (``agent`` config section): ``max_turns`` model turns; the whole trajectory after the prompt
within ``data.max_response_length`` tokens (the trainer's sequence length), each turn within
``agent.max_tokens_per_turn``. A turn that ``max_tokens_per_turn`` cuts is still a turn: the
environment answers it, and the end-of-turn token the model did not write goes into the trajectory
ahead of the observation (masked: it was not sampled). A turn cut by the episode's token budget
ends the episode (``finish_reason`` ``length``); so does an observation that does not fit with room
for one more token. An episode that reaches ``max_turns`` ends after its last model turn, never
with an observation.

An environment that raises, hangs or dies (:class:`megarl.agents.workers.EpisodeFailure`) ends its
episode as failed: the trajectory so far is kept, its score is 0 and the failure is counted; the
run goes on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from megarl.agents.rendering import observation_ids, prompt_ids
from megarl.agents.workers import EpisodeFailure
from megarl.rollout.sampling import Sample, SamplingParams, WeightSegment, resume_seed


class TurnGenerator(Protocol):
    """What an episode needs of the engines: :meth:`megarl.rollout.EngineGroup.generate_turn`."""

    async def generate_turn(self, input_ids: Sequence[int], sampling: SamplingParams, *, max_new_tokens: int, seed: int | None, route: int) -> Sample: ...


@dataclasses.dataclass(frozen=True, slots=True)
class EpisodeLimits:
    """How long an episode may run."""

    max_turns: int
    """Model turns."""
    max_response_tokens: int
    """Tokens after the prompt: every turn and every observation (``data.max_response_length``)."""
    max_tokens_per_turn: int | None = None
    """Tokens of one model turn; None: the rest of ``max_response_tokens``."""


@dataclasses.dataclass(slots=True)
class Trajectory:
    """One episode as the trainer trains on it, and what happened in it."""

    prompt_ids: list[int]
    """The first prompt: the dataset's, or the environment's first observation rendered with the tools."""
    response_ids: list[int] = dataclasses.field(default_factory=list)
    """Every model turn and every observation after the prompt, in order, as token ids."""
    loss_mask: list[bool] = dataclasses.field(default_factory=list)
    """Per response token: True on model tokens, False on observation tokens."""
    logprobs: list[float] = dataclasses.field(default_factory=list)
    """Per response token: the engine's log-prob of a model token; 0.0 on observation tokens."""
    weight_segments: list[WeightSegment] = dataclasses.field(default_factory=list)
    """Which weights sampled which model tokens (offsets into ``response_ids``), oldest first."""
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False)
    """The last model turn's routed experts (``Sample.routed_experts``; routing replay R3): that
    turn's input was the whole trajectory so far, tool outputs included (they were prefilled), so
    its array covers every token up to the turn's last generated one; tokens after it (an
    observation, an end-of-turn token) have none. None: not asked for. Left out of ``==`` (an
    array has no single truth value)."""
    turns: int = 0
    """Model turns taken."""
    final_text: str = ""
    """The last model turn as text (special tokens skipped): what a reward function scores."""
    finish_reason: str = "stop"
    """``stop``: the environment ended it, or ``max_turns``; ``length``: a token limit did."""
    reward: float | None = None
    """The environment's episode reward; None: the reward function scores ``final_text``."""
    failure: str | None = None
    """Why the environment failed it (``error``, ``timeout``, ``died``, ``replay``), or None."""
    failure_message: str = ""
    """The environment's error, for the log."""
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    """The environment's numbers (``StepResult.info``), added up over its steps."""
    max_turns_reached: bool = False
    """It ended because ``max_turns`` model turns were taken, the environment not done."""

    @property
    def observation_tokens(self) -> int:
        return self.loss_mask.count(False)

    def add_model_turn(self, sample: Sample) -> None:
        """Append a turn the engine sampled: its ids, log-probs and weight segments, unchanged."""
        offset = len(self.response_ids)
        self.response_ids += sample.response_ids
        self.loss_mask += [True] * len(sample.response_ids)
        self.logprobs += sample.logprobs
        self.weight_segments += [WeightSegment(segment.version, segment.start + offset, segment.end + offset) for segment in sample.weight_segments]
        self.routed_experts = sample.routed_experts
        self.turns += 1

    def add_observation(self, ids: Sequence[int]) -> None:
        """Append an observation's ids, masked out of the loss."""
        self.response_ids += ids
        self.loss_mask += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)


@dataclasses.dataclass(frozen=True, slots=True)
class EpisodeContext:
    """What every episode of a rollout shares."""

    engines: TurnGenerator
    environments: Any
    """The :class:`megarl.agents.workers.EnvironmentPool` (``reset``, ``step``, ``close_episode``)."""
    tokenizer: Any
    tools: tuple[dict, ...]
    """The environment's tool schemas, rendered into prompts the environment writes."""
    sampling: SamplingParams
    limits: EpisodeLimits


async def run_episode(context: EpisodeContext, row: dict[str, Any], dataset_prompt_ids: Sequence[int], *, episode_id: str, route: int, seed: int | None) -> Trajectory:
    """Play one episode to its end and return its trajectory.

    Args:
        row: what the environment's ``reset`` gets: the dataset row's fields.
        dataset_prompt_ids: the prompt as the dataset rendered it (with the tools), used unless
            ``reset`` returns messages of its own.
        episode_id: unique among the episodes in flight.
        route: the engine of every turn (:meth:`megarl.rollout.EngineGroup.generate_turn`).
        seed: the episode's seed; turn ``k`` draws with ``resume_seed(seed, tokens so far)``, so a
            rerun samples the same episode. None: unseeded.

    Raises:
        EngineError: an engine failed for good (the run's problem, not the episode's).
    """
    limits, tokenizer = context.limits, context.tokenizer
    try:
        first = await context.environments.reset(episode_id, row)
    except EpisodeFailure as failure:
        return Trajectory(prompt_ids=list(dataset_prompt_ids), failure=failure.kind, failure_message=failure.message)
    trajectory = Trajectory(prompt_ids=list(dataset_prompt_ids) if first is None else prompt_ids(tokenizer, first, context.tools))
    try:
        while True:
            room = limits.max_response_tokens - len(trajectory.response_ids)
            limit = room if limits.max_tokens_per_turn is None else min(room, limits.max_tokens_per_turn)
            turn_seed = None if seed is None else resume_seed(seed, len(trajectory.response_ids))
            sample = await context.engines.generate_turn(
                trajectory.prompt_ids + trajectory.response_ids, context.sampling, max_new_tokens=limit, seed=turn_seed, route=route
            )
            trajectory.add_model_turn(sample)
            trajectory.final_text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            if sample.finish_reason == "length" and limit == room:
                trajectory.finish_reason = "length"
                return trajectory
            try:
                result = await context.environments.step(episode_id, trajectory.final_text)
            except EpisodeFailure as failure:
                trajectory.failure, trajectory.failure_message = failure.kind, failure.message
                return trajectory
            for name, value in result.info.items():
                trajectory.info[name] = trajectory.info.get(name, 0.0) + value
            if result.done:
                trajectory.reward = result.reward
                return trajectory
            if trajectory.turns >= limits.max_turns:
                trajectory.max_turns_reached = True
                return trajectory
            ids = after_turn(tokenizer, sample.finish_reason, observation_token_ids(tokenizer, result.observation, context.tools))
            if len(trajectory.response_ids) + len(ids) >= limits.max_response_tokens:
                trajectory.finish_reason = "length"
                return trajectory
            trajectory.add_observation(ids)
    finally:
        await context.environments.close_episode(episode_id)


def after_turn(tokenizer, turn_finish_reason: str, observation: list[int]) -> list[int]:
    """The ids that follow a model turn: ``observation``, after the end-of-turn token the turn
    lacks when a token limit cut it (``finish_reason`` ``length``). The template's observation
    follows that token; it was not sampled, so it goes in with the observation, not trained."""
    return [tokenizer.eos_token_id, *observation] if turn_finish_reason == "length" else observation


def observation_token_ids(tokenizer, observation: list[dict] | str | None, tools: Sequence[dict]) -> list[int]:
    """The ids of an observation: chat messages through the template after the model's
    end-of-turn token, or a string tokenised as it is (the environment wrote its own format)."""
    if observation is None:
        return []
    if isinstance(observation, str):
        return list(tokenizer(observation, add_special_tokens=False)["input_ids"])
    return observation_ids(tokenizer, observation, tools=list(tools) or None)
