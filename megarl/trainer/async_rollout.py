"""``rollout.mode: async``: the first rank generates the next steps' samples while the trainer trains.

A producer thread draws rounds of ``rollout.batch_size`` prompts and sends each to the engines as
soon as the staleness bound admits its samples (:class:`~megarl.rollout.buffer.RolloutBuffer`:
AReaL's capacity rule); a scoring thread scores each round when it comes back, drops the groups
dynamic sampling filters out (their places go at once to the samples after them) and puts the
others into the buffer, in the order the rounds were admitted. The step takes the oldest groups
still within ``rollout.max_staleness`` (:meth:`AsyncRollout.next_batch`); a group past the bound
is dropped and its prompt drawn again.

At a weight update (:meth:`AsyncRollout.weight_update`), with ``rollout.partial_rollout`` the
engines pause (``rollout.pause_mode``) and go on under the new weights: in mode ``abort`` the
requests in flight come back partial and are sent again as prompt + tokens so far
(:meth:`~megarl.rollout.group.EngineGroup.submit_resume`); in ``retract`` and ``in_place`` the
engines keep them. Without partial rollout the update waits for the rounds in flight to finish.
Every token keeps the version that generated it (``ScoredSample.weight_segments``).

Checkpoints (:meth:`AsyncRollout.state_dict`): the data loader's position together with every
prompt drawn but not trained yet (queued, in flight, or waiting in the buffer), taken at one
instant; a resumed run generates those first, so each prompt is trained once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from megarl.algorithms.shaping import dynamic_sampling_keep
from megarl.rollout.buffer import BufferClosed, BufferedGroup, RolloutBuffer
from megarl.rollout.errors import EngineRequestError
from megarl.rollout.sampling import Sample, SamplingParams
from megarl.trainer.batch import ScoredSample
from megarl.agents.play import play_programs, submit_play
from megarl.trainer.rollout import RoundMetric, add_round_metrics, episode_context, round_sampling, sampling_seed, score_samples, score_trajectories
from megarl.trainer.staleness import oldest_version

if TYPE_CHECKING:
    from megarl.trainer.run import Run

WAIT_CHECK_S = 5.0
"""A weight update waiting for the rounds in flight checks again this often (besides being woken)."""
TOP_UP_CHECK_S = 0.2
"""With dynamic sampling the trainer waiting for groups checks this often whether to top up."""


class _RolloutClock:
    """Seconds the rollout was busy (a round in flight or being scored) and the part of them the
    trainer spent on something else than waiting for samples: the overlap."""

    def __init__(self):
        self.busy = False
        self.waiting = False
        self.since = time.perf_counter()
        self.busy_s = 0.0
        self.overlap_s = 0.0
        self.wait_s = 0.0

    def _advance(self) -> None:
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        if self.busy:
            self.busy_s += elapsed
            if not self.waiting:
                self.overlap_s += elapsed
        if self.waiting:
            self.wait_s += elapsed

    def set(self, *, busy: bool | None = None, waiting: bool | None = None) -> None:
        self._advance()
        self.busy = self.busy if busy is None else busy
        self.waiting = self.waiting if waiting is None else waiting

    def read(self) -> dict[str, float]:
        """``time/rollout_busy_s``, ``time/overlap_s``, ``time/wait_rollout_s`` since the last read."""
        self._advance()
        values = {"time/rollout_busy_s": self.busy_s, "time/overlap_s": self.overlap_s, "time/wait_rollout_s": self.wait_s}
        self.busy_s = self.overlap_s = self.wait_s = 0.0
        return values


class AsyncRollout:
    """The producer of an async run (first rank); :meth:`start` it, take a batch per step, wrap
    each weight update in :meth:`weight_update`, :meth:`close` it at the end."""

    def __init__(self, run: Run):
        config = run.config.rollout
        self.run = run
        self.batch_samples = run.config.train.global_batch_size
        self.round_prompts = config.batch_size
        self.round_samples = config.batch_size * config.n_samples_per_prompt
        self.group_size = config.n_samples_per_prompt
        self.partial_rollout = config.partial_rollout
        self.resend_partial = config.partial_rollout and config.pause_mode == "abort"
        self.episodes = run.config.agent.enabled
        """Rounds are multi-turn episodes (``agent.environment`` or ``agent.openai_agent``); their
        turns resume themselves after a pause."""
        self._program_rounds = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="megarl-agent-programs") if run.config.agent.openai_agent else None
        """``agent.openai_agent``: plays the rounds' episodes, one round after another (the program
        workers play one round at a time)."""
        self.pauses = 0
        """Twice the pauses begun (odd while the engines are paused): a sample aborted by megarl's
        own pause is sent again, any other abort is an error."""
        self.buffer = RolloutBuffer(
            self.batch_samples, config.max_staleness, version=run.weight_version, total_samples=run.config.train.steps * self.batch_samples
        )
        self.pending: collections.deque[int] = collections.deque(run.pending_prompts)
        """Prompts drawn but not sent yet: a checkpoint's pending prompts, dropped groups' prompts,
        the rest of a loader batch."""
        self.rounds = run.rollout_rounds
        self.in_flight: dict[int, list[int]] = {}
        """Round -> its prompts, from sending until its groups are in the buffer."""
        self.finished: dict[int, list[BufferedGroup]] = {}
        """Scored rounds waiting for an earlier round to be scored."""
        self.next_round = self.rounds
        """The round whose groups enter the buffer next."""
        self.metrics: dict[str, float] = {}
        """The scored rounds' metrics since the last batch, combined (:func:`add_round_metrics`)."""
        self.scored_samples = 0
        """Samples scored since the last batch (the top-up waits for ``algorithm.max_num_gen_batches`` batches)."""
        self.reserve: list[BufferedGroup] = []
        """Groups dynamic sampling dropped since the last batch, which may top it up."""
        self.clock = _RolloutClock()
        self._lock = threading.Condition()
        """Guards the loader, ``pending``, ``in_flight``, ``finished``, ``next_round``, ``rounds``,
        ``pauses``, ``metrics``, ``scored_samples``, ``reserve`` and ``clock``; taken before the
        buffer's own lock, never after."""
        self._scoring = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="megarl-rollout-score")
        self._thread = threading.Thread(target=self._produce, name="megarl-rollout-producer", daemon=True)

    def start(self) -> None:
        """Start generating."""
        self._thread.start()

    def close(self) -> None:
        """Stop generating: no round starts, scoring queued is cancelled (rounds in flight are
        abandoned); then shut the engines down and :meth:`join`."""
        self.buffer.close()
        self._scoring.shutdown(wait=False, cancel_futures=True)
        if self._program_rounds is not None:
            self._program_rounds.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._lock.notify_all()

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait for the producer and for the round being scored, if any (after :meth:`close`)."""
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._scoring.shutdown(wait=True)

    def _fail(self, error: BaseException, round_index: int | None = None) -> None:
        """Hand ``error`` to the trainer: its next take raises it, a weight update waiting for the
        rounds in flight stops waiting."""
        with self._lock:
            if round_index is not None:
                self.in_flight.pop(round_index, None)
            self.buffer.fail(error)
            self._lock.notify_all()

    # The producer.

    def _produce(self) -> None:
        round_index = None
        try:
            while True:
                round_index = None
                samples = self.buffer.admit(self.round_samples, group=self.group_size)
                with self._lock:
                    if self.buffer.held:
                        # A weight update began between the admission and here: it waits for the
                        # rounds in flight, and this one must not start under it.
                        self.buffer.release(samples)
                        continue
                    positions = self._draw(samples // self.group_size)
                    round_index, self.rounds = self.rounds, self.rounds + 1
                    self.in_flight[round_index] = positions
                    self.clock.set(busy=True)
                    sent_during = self.pauses
                prompts = [self.run.train_set.prompts[position] for position in positions]
                sampling = round_sampling(self.run, sampling_seed(self.run.config.rollout.seed, round_index, 0))
                sent = time.perf_counter()
                if self._program_rounds is not None:
                    future = self._program_rounds.submit(
                        play_programs, self.run.endpoint, self.run.programs, prompts, sampling, samples_per_prompt=sampling.n, label=f"round {round_index}"
                    )
                elif self.episodes:
                    # Multi-turn episodes: a turn a pause aborts resumes on its own (megarl.rollout.turns).
                    context = episode_context(self.run, sampling)
                    future = submit_play(context, self.run.engines, prompts, samples_per_prompt=sampling.n, label=f"round {round_index}")
                else:
                    future = self.run.engines.submit_generate([prompt.prompt_ids for prompt in prompts], sampling, partial=self.resend_partial)
                self._when_done(future, round_index, prompts, sampling, sent, sent_during)
        except BufferClosed:
            return
        except BaseException as error:  # noqa: BLE001 - handed to the trainer, which raises it
            self._fail(error, round_index)

    def _draw(self, count: int) -> list[int]:
        """The next ``count`` prompts: pending ones first, then the loader's (lock held)."""
        while len(self.pending) < count:
            self.pending.extend(self.run.loader.next_positions())
        return [self.pending.popleft() for _ in range(count)]

    def _when_done(self, future: concurrent.futures.Future, round_index: int, prompts, sampling: SamplingParams, sent: float, sent_during: int) -> None:
        def finish(done: concurrent.futures.Future) -> None:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: the run is closing
                self._scoring.submit(self._finish, done, round_index, prompts, sampling, sent, sent_during)

        future.add_done_callback(finish)

    def _finish(self, future: concurrent.futures.Future, round_index: int, prompts, sampling: SamplingParams, sent: float, sent_during: int) -> None:
        """A round came back (scoring thread): send its partial samples again, or score it into the buffer."""
        try:
            if self.episodes:
                self._file(round_index, *self._scored_episodes(future.result(), prompts, sampling, round_index, sent))
                return
            samples: list[Sample] = future.result()
            if self.resend_partial and any(sample.finish_reason == "abort" for sample in samples):
                with self._lock:
                    paused_since = self.pauses != sent_during or self.pauses % 2 == 1
                    resent_during = self.pauses
                if not paused_since:
                    aborted = next(sample for sample in samples if sample.finish_reason == "abort")
                    raise EngineRequestError(
                        self.run.engines.route(aborted.prompt_index).label,
                        f"a sample of round {round_index} came back aborted although no weight update paused the engines since "
                        "it was sent (an /abort_request from elsewhere?); megarl sends again only what its own pauses abort",
                    )
                prompt_ids = [prompt.prompt_ids for prompt in prompts]
                resumed = self.run.engines.submit_resume(prompt_ids, samples, sampling, partial=True)
                self._when_done(resumed, round_index, prompts, sampling, sent, resent_during)
                return
            generated = time.perf_counter()
            records, metrics = score_samples(self.run, prompts, samples, first_group=round_index * self.round_prompts, label=f"round {round_index}")
            metrics["time/generate_s"] = RoundMetric(generated - sent, adds_up=True)
            self._file(round_index, [sample.prompt_index for sample in samples], records, metrics)
        except BaseException as error:  # noqa: BLE001 - handed to the trainer, which raises it
            self._fail(error, round_index)

    def _scored_episodes(self, trajectories, prompts, sampling: SamplingParams, round_index: int, sent: float) -> tuple[list[int], list[ScoredSample], dict[str, RoundMetric]]:
        """A round of episodes scored (scoring thread): each record's prompt, the records, the metrics."""
        generated = time.perf_counter()
        records, metrics = score_trajectories(
            self.run, prompts, trajectories, samples_per_prompt=sampling.n, first_group=round_index * self.round_prompts, label=f"round {round_index}"
        )
        metrics["time/generate_s"] = RoundMetric(generated - sent, adds_up=True)
        metrics["time/reward_s"] = RoundMetric(time.perf_counter() - generated, adds_up=True)
        return [index // sampling.n for index in range(len(records))], records, metrics

    def _file(self, round_index: int, prompt_indices: list[int], records: list[ScoredSample], metrics: dict[str, RoundMetric]) -> None:
        """Put a scored round into the buffer in whole groups, after dynamic sampling's filter, in
        the order the rounds were admitted (scoring thread)."""
        by_prompt: dict[int, list[ScoredSample]] = {}
        for prompt_index, record in zip(prompt_indices, records):
            by_prompt.setdefault(prompt_index, []).append(record)
        positions = self.in_flight[round_index]
        groups = [
            BufferedGroup(samples=group, oldest_version=min(oldest_version(record) for record in group), prompt_position=positions[prompt_index])
            for prompt_index, group in sorted(by_prompt.items())
        ]
        groups, filtered = self._filter(groups, metrics) if self.run.config.algorithm.dynamic_sampling else (groups, [])
        with self._lock:
            add_round_metrics(self.metrics, metrics)
            self.scored_samples += len(records)
            # A filtered group is consumed now: its place goes to the samples after it at once.
            self.reserve += filtered
            self.buffer.release(sum(len(group.samples) for group in filtered))
            self.finished[round_index] = groups
            # Rounds enter the buffer in the order they were admitted: the admission rule's order.
            while self.next_round in self.finished:
                del self.in_flight[self.next_round]
                # Under the lock: a checkpoint sees these prompts in flight or in the buffer.
                self.buffer.put(self.finished.pop(self.next_round))
                self.next_round += 1
            self.clock.set(busy=bool(self.in_flight))
            self._lock.notify_all()

    def _filter(self, groups: list[BufferedGroup], metrics: dict[str, RoundMetric]) -> tuple[list[BufferedGroup], list[BufferedGroup]]:
        """``(kept, dropped)``: the groups DAPO's dynamic sampling keeps and drops
        (``algorithm.dynamic_sampling_mean_range``); the counts go into ``metrics`` (``filter/*``)."""
        scores = torch.tensor([sample.score for group in groups for sample in group.samples])
        group_ids = torch.tensor([index for index, group in enumerate(groups) for _ in group.samples])
        keep, counts = dynamic_sampling_keep(scores, group_ids, mean_range=self.run.config.algorithm.dynamic_sampling_mean_range)
        metrics.update({f"filter/{name}": RoundMetric(value, adds_up=True) for name, value in counts.items()})
        # A group is kept or dropped whole: its first sample says which.
        kept_groups = keep[torch.searchsorted(group_ids, torch.arange(len(groups)))].tolist()
        return [group for group, kept in zip(groups, kept_groups) if kept], [group for group, kept in zip(groups, kept_groups) if not kept]

    # The trainer's side.

    def next_batch(self) -> tuple[list[ScoredSample], dict[str, float]]:
        """The step's samples (first rank): ``train.global_batch_size`` of them in whole groups, the
        oldest within the staleness bound first. With dynamic sampling the groups were filtered as
        they were scored; once ``algorithm.max_num_gen_batches`` batches of samples were scored
        since the last batch without filling this one (the synchronous step's rule, in samples), it is topped up from the filtered groups
        still within the bound (``filter/topped_up_samples``).

        Returns:
            ``(samples, metrics)``: ``reward/mean`` and ``reward/std`` over the batch and the groups
            the filter dropped since the last batch; ``reward/failures``, ``reward/timeouts``, the
            reward extras, ``filter/*``, ``time/generate_s`` and ``time/reward_s`` over the rounds
            scored since the last batch; ``rollout/dropped_stale`` (samples past the bound, their
            prompts drawn again); ``rollout/buffer_samples`` and ``rollout/in_flight_samples``
            (samples scored and waiting; samples of rounds sent and not yet in the buffer) after
            the take; ``time/overlap_s`` (seconds since the last batch in which a round was in
            flight while the trainer did not wait for samples), ``time/rollout_busy_s``,
            ``time/wait_rollout_s``.
        """
        dynamic_sampling = self.run.config.algorithm.dynamic_sampling
        kept: list[ScoredSample] = []
        metrics: dict[str, float] = {}
        with self._lock:
            self.clock.set(waiting=True)
        while len(kept) < self.batch_samples:
            group = self.buffer.take(timeout_s=TOP_UP_CHECK_S if dynamic_sampling else None)
            if group is not None:
                kept += group.samples
            elif topped_up := self._top_up(kept):
                metrics["filter/topped_up_samples"] = topped_up
        dropped = self.buffer.drain_dropped()
        with self._lock:
            self.pending.extendleft(reversed([group.prompt_position for group in dropped]))
            self.clock.set(waiting=False)
            scores = torch.tensor([sample.score for sample in kept] + [sample.score for group in self.reserve for sample in group.samples])
            metrics.update(self.metrics)
            self.metrics, self.reserve, self.scored_samples = {}, [], 0
            in_flight = sum(len(positions) for positions in self.in_flight.values()) * self.group_size
            metrics.update(self.clock.read())
        metrics.update(
            {
                "rollout/engine_restarts": self.run.engines.restarts,
                "reward/mean": scores.mean().item(),
                "reward/std": scores.std().item(),
                "rollout/dropped_stale": sum(len(group.samples) for group in dropped),
                "rollout/buffer_samples": self.buffer.ready_samples,
                "rollout/in_flight_samples": in_flight,
            }
        )
        return kept[: self.batch_samples], metrics

    def _top_up(self, kept: list[ScoredSample]) -> int:
        """Fill ``kept`` from the filtered groups within the bound, once enough samples were scored
        since the last batch; the samples it needed (0: it did not top up)."""
        with self._lock:
            if self.scored_samples < self.run.config.algorithm.max_num_gen_batches * self.batch_samples:
                return 0
            needed = self.batch_samples - len(kept)
            fresh = [group for group in self.reserve if self.buffer.version - group.oldest_version <= self.buffer.max_staleness]
            if sum(len(group.samples) for group in fresh) < needed:
                return 0
            for group in fresh:
                if len(kept) >= self.batch_samples:
                    break
                kept += group.samples
                self.reserve.remove(group)
                self.buffer.release(-len(group.samples))  # trained after all: its place is taken again
            return needed

    @contextlib.contextmanager
    def weight_update(self, version: int):
        """Around pushing ``version`` to the engines (first rank): pause the engines (partial
        rollout) or let the rounds in flight finish first; afterwards admission runs on to the
        new version's bound and the engines go on."""
        if self.partial_rollout:
            with self._lock:
                self.pauses += 1
            self.run.engines.pause_generation(self.run.config.rollout.pause_mode)
        else:
            self.buffer.hold(True)
            with self._lock:
                while self.in_flight and self.buffer.error is None and not self.buffer.closed:
                    self._lock.wait(timeout=WAIT_CHECK_S)
        try:
            yield
        finally:
            self.buffer.set_version(version)
            if self.partial_rollout:
                self.run.engines.continue_generation()
                with self._lock:
                    self.pauses += 1
            else:
                self.buffer.hold(False)

    def state_dict(self) -> dict[str, Any]:
        """``data`` (the loader's position), ``pending_prompts`` (every prompt drawn but not
        trained: waiting in the buffer, in flight, queued) and ``rollout_rounds``, at one instant."""
        with self._lock:
            waiting = [group.prompt_position for group in self.buffer.groups()]
            in_flight = [position for _, positions in sorted(self.in_flight.items()) for position in positions]
            return {
                "data": self.run.loader.state_dict(),
                "pending_prompts": waiting + in_flight + list(self.pending),
                "rollout_rounds": self.rounds,
            }
