"""Many episodes at once over the engines, and what they add up to.

:func:`play` starts every episode of a rollout round as a task on the engine group's event loop:
the engines batch the turns that are waiting (SGLang and the ``hf`` engine both batch whatever is
queued), the environment workers serve the steps, and an episode never waits for another.
Episode ``(prompt i, sample j)`` runs on engine ``i % num_engines`` (all of a prompt's episodes
share its prefix; with a router, every turn goes through it keyed by ``i``) with seed
``sample_seed(sampling.seed, i, j)``, so a rerun plays the same episodes.

:func:`play_programs` plays them with an agent program instead (``agent.openai_agent``): each
episode is opened on the chat endpoint with the same engine, seed and the round's sampling, the
program workers play them all at once against their URLs, and each trajectory is what the
endpoint recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator, Sequence
from typing import Any

from megarl.agents.episode import EpisodeContext, Trajectory, run_episode
from megarl.agents.openai_server import ChatEndpoint
from megarl.agents.programs import ProgramEpisode, ProgramPool
from megarl.data.datasets import Prompt
from megarl.rollout.sampling import SamplingParams, sample_seed


def environment_row(prompt: Prompt) -> dict[str, Any]:
    """What an environment's ``reset`` gets for a prompt: the row's other fields, the prompt as
    the model reads it (``prompt``) and the reference answer (``answer``)."""
    return {**prompt.metadata, "prompt": prompt.text, "answer": prompt.answer}


def round_episodes(prompts: Sequence[Prompt], samples_per_prompt: int, label: str, seed: int | None) -> Iterator[tuple[Prompt, str, int, int | None]]:
    """``(prompt, episode_id, route, seed)`` of every episode of a round, prompt-major: episode
    ``(i, j)`` is ``{label}/{i}/{j}``, runs on engine ``i % n`` and draws with
    ``sample_seed(seed, i, j)`` (None: unseeded), whoever plays it."""
    for index, prompt in enumerate(prompts):
        for sample in range(samples_per_prompt):
            yield prompt, f"{label}/{index}/{sample}", index, None if seed is None else sample_seed(seed, index, sample)


def play(context: EpisodeContext, engines, prompts: Sequence[Prompt], *, samples_per_prompt: int, label: str) -> list[Trajectory]:
    """Play ``samples_per_prompt`` episodes of every prompt, all at once; prompt-major order.

    Args:
        engines: the :class:`~megarl.rollout.EngineGroup` whose loop runs the episodes.
        label: names this round's episodes (``step 3 round 0``): unique among rounds in flight.

    Raises:
        EngineError: an engine failed for good.
    """
    return submit_play(context, engines, prompts, samples_per_prompt=samples_per_prompt, label=label).result()


def submit_play(context: EpisodeContext, engines, prompts: Sequence[Prompt], *, samples_per_prompt: int, label: str) -> concurrent.futures.Future:
    """:func:`play` without waiting: the future holds the trajectories (``rollout.mode: async``
    keeps rounds in flight while the trainer trains)."""
    async def all_episodes() -> list[Trajectory]:
        return await asyncio.gather(*(
            run_episode(context, environment_row(prompt), prompt.prompt_ids, episode_id=episode_id, route=route, seed=seed)
            for prompt, episode_id, route, seed in round_episodes(prompts, samples_per_prompt, label, context.sampling.seed)
        ))

    return engines.run(all_episodes())


def play_programs(endpoint: ChatEndpoint, programs: ProgramPool, prompts: Sequence[Prompt], sampling: SamplingParams, *, samples_per_prompt: int, label: str) -> list[Trajectory]:
    """Play ``samples_per_prompt`` episodes of every prompt with the agent program, all at once;
    prompt-major order.

    An episode whose program failed (:class:`~megarl.agents.programs.ProgramOutcome`: ``error``,
    ``timeout``, ``died``) keeps what the endpoint recorded and its failure; one that made no
    answered call has an empty response after the dataset's prompt, and fails with ``error`` when
    its program returned. A program that raised after the endpoint refused a call for a limit
    (``max_turns``, the token budget) did not fail: the episode ended there, as a built-in one does.

    Args:
        label: names this round's episodes (``step 3 round 0``): unique among rounds in flight.

    Raises:
        EngineError: an engine failed for good during the round (the endpoint answered the
            program's call with an error and kept it), as :func:`play` raises it.
    """
    episodes = [
        ProgramEpisode(episode_id, endpoint.open_episode(episode_id, route=route, seed=seed, sampling=sampling), environment_row(prompt))
        for prompt, episode_id, route, seed in round_episodes(prompts, samples_per_prompt, label, sampling.seed)
    ]
    recorded: dict[str, Trajectory | None] = {}

    def close(episode_id: str) -> None:
        """Close the episode on the endpoint (its program's next call is refused), keeping what it recorded."""
        try:
            recorded[episode_id] = endpoint.trajectory(episode_id)
        except ValueError:  # no answered call
            recorded[episode_id] = None

    try:
        outcomes = programs.play(episodes, on_timeout=close)
    finally:
        for episode in episodes:
            if episode.episode_id not in recorded:
                close(episode.episode_id)
    if endpoint.engine_failure is not None:
        raise endpoint.engine_failure
    trajectories = []
    for position, (episode, outcome) in enumerate(zip(episodes, outcomes)):
        trajectory = recorded[episode.episode_id]
        failure, message = outcome.failure, outcome.message
        if trajectory is None:
            trajectory = Trajectory(prompt_ids=list(prompts[position // samples_per_prompt].prompt_ids))
            if failure is None:
                failure, message = "error", "the program returned without an answered call to the chat endpoint"
        elif failure == "error" and (trajectory.max_turns_reached or trajectory.finish_reason == "length"):
            failure = None  # the endpoint ended the episode at a limit, and the program stopped on its refusal
        trajectory.reward = outcome.reward if failure is None else None
        trajectory.failure, trajectory.failure_message = failure, message if failure is not None else ""
        trajectories.append(trajectory)
    return trajectories


def episode_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """A round's ``agent/*`` metrics (means per episode unless named a count) and ``env/<name>``,
    for each number the environment reported (``StepResult.info``, added up over an episode's
    steps), its mean over the episodes that reported it (e.g. ``env/tool_calls``)."""
    count = len(trajectories)
    response_tokens = sum(len(trajectory.response_ids) for trajectory in trajectories)
    metrics = {
        "agent/turns_mean": sum(trajectory.turns for trajectory in trajectories) / count,
        "agent/turns_max": max(trajectory.turns for trajectory in trajectories),
        "agent/episode_length_mean": response_tokens / count,
        "agent/observation_token_share": sum(trajectory.observation_tokens for trajectory in trajectories) / max(response_tokens, 1),
        "agent/max_turns_reached": sum(trajectory.max_turns_reached for trajectory in trajectories) / count,
        "agent/env_failures": sum(trajectory.failure is not None for trajectory in trajectories),
        "agent/env_timeouts": sum(trajectory.failure == "timeout" for trajectory in trajectories),
    }
    names = sorted({name for trajectory in trajectories for name in trajectory.info})
    for name in names:
        reported = [trajectory.info[name] for trajectory in trajectories if name in trajectory.info]
        metrics[f"env/{name}"] = sum(reported) / len(reported)
    return metrics
