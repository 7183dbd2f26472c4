"""What both rollout modes do on the first rank: generate a round of prompts, score its samples into
:class:`ScoredSample` records, and pack the records a step trains on into a :class:`TrainBatch`.

``rollout.mode: sync`` calls these once per round inside the step (:func:`megarl.trainer.loop.collect_batch`);
``async`` calls them from its producer (:mod:`megarl.trainer.async_rollout`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from megarl.agents.episode import EpisodeContext, Trajectory
from megarl.agents.play import episode_metrics, play, play_programs
from megarl.data.datasets import Prompt
from megarl.rollout.sampling import Sample, SamplingParams
from megarl.trainer.batch import SampleText, ScoredSample, TrainBatch
from megarl.trainer.launch import episode_limits
from megarl.trainer.staleness import newest_version_mask, staleness_metrics

if TYPE_CHECKING:
    from megarl.trainer.run import Run

log = logging.getLogger("megarl")


@dataclasses.dataclass(frozen=True, slots=True)
class RoundMetric:
    """A metric of one rollout round and how the step combines its rounds."""

    value: float
    adds_up: bool
    """True: the step's value is the sum over its rounds (counts, seconds); False: the last round's."""


def add_round_metrics(metrics: dict[str, float], round_metrics: dict[str, RoundMetric]) -> None:
    """Fold one round's metrics into the step's (sums for counts and seconds, else the last value)."""
    for name, metric in round_metrics.items():
        metrics[name] = metrics.get(name, 0.0) + metric.value if metric.adds_up else metric.value


def sampling_seed(base: int, step: int, round_index: int) -> int:
    """A distinct sampling seed for every (step, round), fixed by the run's seed."""
    return (base * 1_000_003 + step) * 1_009 + round_index + 1


def round_sampling(run: Run, seed: int) -> SamplingParams:
    """The sampling parameters of a training round."""
    return SamplingParams.from_config(run.config.rollout, max_new_tokens=run.config.data.max_response_length, seed=seed)


def score_samples(run: Run, prompts: Sequence[Prompt], samples: Sequence[Sample], *, first_group: int, label: str) -> tuple[list[ScoredSample], dict[str, RoundMetric]]:
    """Score a round's samples (first rank) into the records the trainer trains on.

    Args:
        prompts: the round's prompts; a sample answers ``prompts[sample.prompt_index]``.
        samples: the engines' samples, finished.
        first_group: the group id of the round's first prompt (prompt ``i`` is group
            ``first_group + i``).
        label: the round's name in the warning of a sample that fails to score (``step 3``).

    Returns:
        one record per sample, and the round's reward metrics (``time/reward_s`` included).
    """
    start = time.perf_counter()
    texts = [run.tokenizer.decode(sample.response_ids, skip_special_tokens=True) for sample in samples]
    scored = run.score([prompts[sample.prompt_index].reward_kwargs(text) for sample, text in zip(samples, texts)])
    if scored.failures and not run.reward_failure_shown:
        run.reward_failure_shown = True
        failed = scored.first_failed
        log.warning(
            "%s: %d of %d samples failed to score; each scores 0 and counts in reward/failures (shown once per run). "
            "The first: %s\n  prompt: %r\n  response: %r",
            label, scored.failures, len(samples), scored.first_error, prompts[samples[failed].prompt_index].text, texts[failed],
        )
    mask_older = run.config.rollout.mask_offpolicy_in_partial_rollout
    records = []
    for sample, score, text, extras in zip(samples, scored.scores, texts, scored.sample_extras):
        prompt = prompts[sample.prompt_index]
        record = ScoredSample(
            prompt_ids=prompt.prompt_ids,
            response_ids=sample.response_ids,
            rollout_log_probs=sample.logprobs,
            finish_reason=sample.finish_reason,
            group=first_group + sample.prompt_index,
            score=score,
            weight_version=sample.weight_version,
            weight_segments=sample.weight_segments,
            routed_experts=sample.routed_experts,
            text=SampleText(prompt, text, extras),
        )
        if mask_older:
            record.loss_mask = newest_version_mask(record)
        records.append(record)
    metrics = {
        "time/reward_s": RoundMetric(time.perf_counter() - start, adds_up=True),
        "reward/failures": RoundMetric(scored.failures, adds_up=True),
        "reward/timeouts": RoundMetric(scored.timeouts, adds_up=True),
        **{f"reward/{name}": RoundMetric(value, adds_up=False) for name, value in scored.extras.items()},
    }
    return records, metrics


def play_and_score(run: Run, prompts: Sequence[Prompt], sampling: SamplingParams, *, first_group: int, label: str) -> tuple[list[ScoredSample], dict[str, RoundMetric]]:
    """Multi-turn rollouts (first rank): ``sampling.n`` episodes of every prompt, played with the
    environment (``agent.environment``, :func:`megarl.agents.play.play`) or the agent program
    (``agent.openai_agent``, :func:`megarl.agents.play.play_programs`), scored into the records
    the trainer trains on.

    An episode's score is the environment's (or program's) reward when it gives one, else the
    reward function's on the last model turn (``response`` is that turn's text); an episode the
    environment or program failed scores 0 (counted in ``agent/env_failures``). Its record trains
    on the model's tokens only (the loss mask is 0 on observations).
    """
    start = time.perf_counter()
    if run.programs is not None:
        trajectories = play_programs(run.endpoint, run.programs, prompts, sampling, samples_per_prompt=sampling.n, label=label)
    else:
        trajectories = play(episode_context(run, sampling), run.engines, prompts, samples_per_prompt=sampling.n, label=label)
    played = time.perf_counter()
    records, metrics = score_trajectories(run, prompts, trajectories, samples_per_prompt=sampling.n, first_group=first_group, label=label)
    metrics["time/generate_s"] = RoundMetric(played - start, adds_up=True)
    metrics["time/reward_s"] = RoundMetric(time.perf_counter() - played, adds_up=True)
    return records, metrics


def episode_context(run: Run, sampling: SamplingParams) -> EpisodeContext:
    """What the episodes of a round with ``run``'s environment share."""
    return EpisodeContext(
        engines=run.engines, environments=run.environments, tokenizer=run.tokenizer, tools=run.tools, sampling=sampling, limits=episode_limits(run.config)
    )


def score_trajectories(
    run: Run, prompts: Sequence[Prompt], trajectories: Sequence[Trajectory], *, samples_per_prompt: int, first_group: int, label: str
) -> tuple[list[ScoredSample], dict[str, RoundMetric]]:
    """Score a round's episodes (prompt-major, ``samples_per_prompt`` each) into their records, and
    the round's ``agent/*``, ``env/*`` and reward failure metrics."""
    failed = next((trajectory for trajectory in trajectories if trajectory.failure is not None), None)
    if failed is not None and not run.environment_failure_shown:
        run.environment_failure_shown = True
        source = "the agent program" if run.programs is not None else "an environment"
        log.warning("%s: %s failed an episode (%s); it scores 0 and counts in agent/env_failures (shown once per run): %s", label, source, failed.failure, failed.failure_message)
    to_score = [index for index, trajectory in enumerate(trajectories) if trajectory.reward is None and trajectory.failure is None]
    scored = run.score([prompts[index // samples_per_prompt].reward_kwargs(trajectories[index].final_text) for index in to_score]) if to_score else None
    scores = [0.0 if trajectory.failure is not None else trajectory.reward for trajectory in trajectories]
    extras: list[dict[str, float]] = [{} for _ in trajectories]
    for position, index in enumerate(to_score):
        scores[index], extras[index] = scored.scores[position], scored.sample_extras[position]
    # The episode as text: every turn after the prompt, with the chat template's turn markers.
    texts = [
        SampleText(prompts[index // samples_per_prompt], run.tokenizer.decode(trajectory.response_ids, skip_special_tokens=False), extras[index])
        for index, trajectory in enumerate(trajectories)
    ]
    records = [
        ScoredSample(
            prompt_ids=trajectory.prompt_ids, response_ids=trajectory.response_ids, rollout_log_probs=trajectory.logprobs,
            finish_reason=trajectory.finish_reason, group=first_group + index // samples_per_prompt, score=float(score),
            weight_version=trajectory.weight_segments[-1].version if trajectory.weight_segments else None,
            weight_segments=tuple(trajectory.weight_segments), loss_mask=trajectory.loss_mask, routed_experts=trajectory.routed_experts,
            text=text,
        )
        for index, (trajectory, score, text) in enumerate(zip(trajectories, scores, texts))
    ]
    if run.config.rollout.mask_offpolicy_in_partial_rollout:
        for record in records:
            record.loss_mask = [model and newest for model, newest in zip(record.loss_mask, newest_version_mask(record))]
    metrics = {name: RoundMetric(value, adds_up=name in ("agent/env_failures", "agent/env_timeouts")) for name, value in episode_metrics(trajectories).items()}
    metrics.update({
        "reward/failures": RoundMetric(scored.failures if scored else 0, adds_up=True),
        "reward/timeouts": RoundMetric(scored.timeouts if scored else 0, adds_up=True),
    })
    return records, metrics


def generate_round(run: Run, step: int, round_index: int, *, batches: int = 1, first_group: int = 0) -> tuple[dict[str, RoundMetric], list[ScoredSample]]:
    """Round ``round_index`` of a synchronous step (first rank): the loader's next ``batches``
    batches of prompts, generated together in one call under the current weights, and scored.

    Args:
        first_group: the group id of the round's first prompt (the prompts the step's earlier
            rounds generated), so that group ids are unique within the step.

    Returns:
        ``(metrics, samples)``: the round's metrics and one :class:`ScoredSample` per response.
    """
    prompts = [prompt for _ in range(batches) for prompt in next(run.loader)]
    sampling = round_sampling(run, sampling_seed(run.config.rollout.seed, step, round_index))
    if run.plays_episodes:
        records, metrics = play_and_score(run, prompts, sampling, first_group=first_group, label=f"step {step} round {round_index}")
    else:
        start = time.perf_counter()
        samples = run.engines.generate([prompt.prompt_ids for prompt in prompts], sampling)
        metrics = {"time/generate_s": RoundMetric(time.perf_counter() - start, adds_up=True)}
        records, scoring = score_samples(run, prompts, samples, first_group=first_group, label=f"step {step}")
        metrics.update(scoring)
        if run.config.algorithm.advantage_estimator == "remax":
            records, metrics["reward/greedy_mean"] = with_greedy_baselines(run, prompts, records, sampling, first_group=first_group, label=f"step {step}")
    return {
        "rollout/engine_restarts": RoundMetric(run.engines.restarts, adds_up=False),
        "rollout/prompts": RoundMetric(len(prompts), adds_up=True),
        **metrics,
    }, records


def with_greedy_baselines(
    run: Run, prompts: Sequence[Prompt], records: Sequence[ScoredSample], sampling: SamplingParams, *, first_group: int, label: str
) -> tuple[list[ScoredSample], RoundMetric]:
    """ReMax's baselines (first rank): one greedy answer to every prompt (temperature 0, the round's
    length limit), scored by the same reward; each record gets its prompt's greedy score as
    ``baseline``. The greedy answers are not trained on.

    Returns:
        the records with their baselines, and the greedy answers' mean score.
    """
    greedy = run.engines.generate([prompt.prompt_ids for prompt in prompts], dataclasses.replace(sampling, temperature=0.0, n=1))
    scored, _ = score_samples(run, prompts, greedy, first_group=first_group, label=f"{label} (greedy baselines)")
    baselines = [record.score for record in scored]
    with_baselines = [dataclasses.replace(record, baseline=baselines[record.group - first_group]) for record in records]
    return with_baselines, RoundMetric(sum(baselines) / len(baselines), adds_up=False)


def add_teacher_log_probs(run: Run, samples: Sequence[ScoredSample], metrics: dict[str, float]) -> None:
    """On-policy distillation from the teacher's engines (``algorithm.opd_type`` sglang, first rank;
    a Megatron teacher is :mod:`megarl.trainer.teacher`'s): the teacher's log-prob of every
    response token of the step's samples, given its prompt and the tokens before it, exactly as
    sampled, into each record's ``teacher_log_probs``; ``time/teacher_s`` into ``metrics``. Works
    on whatever the step trains, so synchronous and asynchronous rollouts and episodes (whose
    observation tokens are scored too, and masked later) take the same path."""
    if run.teacher is None:
        raise RuntimeError("algorithm.use_opd is on but this run started no teacher engines (teacher.path or teacher.engine_urls)")
    start = time.perf_counter()
    scored = run.teacher.prompt_log_probs(
        [list(sample.prompt_ids) + list(sample.response_ids) for sample in samples], [len(sample.prompt_ids) - 1 for sample in samples]
    )
    for sample, values in zip(samples, scored):
        sample.teacher_log_probs = values
    metrics["time/teacher_s"] = time.perf_counter() - start


def batch_of(run: Run, samples: Sequence[ScoredSample], metrics: dict[str, float]) -> tuple[TrainBatch, torch.Tensor, dict[str, float]]:
    """Pack the samples a step trains on (every rank), adding their staleness and length metrics to
    ``metrics``.

    Returns:
        ``(batch, scores [B], metrics)``.
    """
    metrics.update(staleness_metrics(samples, run.weight_version))
    routing = run.policy.routing_layout if run.config.algorithm.routing_replay == "r3" else None
    batch = TrainBatch.from_scored(samples, pad_token_id=run.tokenizer.pad_token_id, pad_multiple=run.pad_multiple, routing=routing)
    lengths = batch.response_lengths.float()
    metrics.update(
        {
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/clip_fraction": batch.truncated.float().mean().item(),
        }
    )
    return batch, torch.tensor([sample.score for sample in samples]), metrics
