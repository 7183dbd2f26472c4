"""The RL loop: :func:`fit` runs the steps, :func:`train_step` is one step (``docs/rl_step.md``).

Everything below is plain function calls; the pieces live in ``megarl/trainer/``. The command
(``megarl/train.py``) checks its inputs before it imports this module, which imports torch and,
through the run, Megatron.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm import tqdm

from megarl.algorithms.shaping import dynamic_sampling_keep
from megarl.config import save_config
from megarl.report import finish_run
from megarl.trainer.batch import SampleText, ScoredSample, TrainBatch
from megarl.trainer.experience import prepare_update
from megarl.trainer.generations import SHOWN, rollout_records, write_generations
from megarl.trainer.rollout import add_round_metrics, add_teacher_log_probs, batch_of, generate_round
from megarl.trainer.validation import validate

if TYPE_CHECKING:
    from megarl.trainer.run import Run

log = logging.getLogger("megarl")

KEEP_RATE_MEMORY = 0.5
"""Weight of the newest step in dynamic sampling's running keep rate (:attr:`Run.keep_rate
<megarl.trainer.run.Run.keep_rate>`); the previous estimate keeps the rest."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite gradients step after step); the message says why."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) while the steps ran (``during``: "step N", or "the HF export")."""

    def __init__(self, during: str):
        super().__init__(f"interrupted during {during}")
        self.during = during


def on_first_rank(run: Run, work) -> object:
    """Run ``work()`` on the first rank and give its result to every rank. An error there is
    raised on every rank (instead of leaving the others waiting in the broadcast)."""
    payload: list = [None]
    if run.is_first_rank:
        try:
            payload = [("ok", work())]
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
            payload = [("error", f"{type(error).__name__}: {error}")]
            failure = error
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        if run.is_first_rank:
            raise failure
        raise TrainingStopped(f"the first rank failed: {value}")
    return value


def round_batches(missing_samples: int, n_samples_per_prompt: int, batch_size: int, keep_rate: float) -> int:
    """How many loader batches (of ``batch_size`` prompts) to generate in one call for
    ``missing_samples`` more samples when a fraction ``keep_rate`` of the prompt groups is kept."""
    groups = -(-missing_samples // n_samples_per_prompt)
    return max(1, math.ceil(groups / (max(keep_rate, 1e-3) * batch_size)))


def collect_batch(run: Run, step: int) -> tuple[TrainBatch, torch.Tensor, dict[str, float], list[SampleText]]:
    """The step's train batch, rolled out and packed on the first rank (:func:`roll_out`, or in
    ``rollout.mode: async`` the producer's :meth:`AsyncRollout.next_batch
    <megarl.trainer.async_rollout.AsyncRollout.next_batch>`; with on-policy distillation from the
    teacher's engines scored by them, :func:`~megarl.trainer.rollout.add_teacher_log_probs`; a
    Megatron teacher scores the batch in :func:`train_step`), and sent to every rank as tensors
    (:func:`share_batch`).

    Returns:
        ``(batch, scores [B], metrics, texts)``, the first three the same on every rank; ``texts``:
        with ``logging.rollout_dir`` on the first rank, each trained sample's
        :class:`~megarl.trainer.batch.SampleText` in batch order, else empty.
    """
    texts: list[SampleText] = []

    def first_rank_batch():
        samples, metrics = run.rollout.next_batch() if run.config.rollout.mode == "async" else roll_out(run, step)
        if run.config.algorithm.teacher_in_engines:
            add_teacher_log_probs(run, samples, metrics)
        if run.config.logging.rollout_dir is not None:
            texts.extend(sample.text for sample in samples)
        return batch_of(run, samples, metrics)

    return *share_batch(run, first_rank_batch), texts


def roll_out(run: Run, step: int) -> tuple[list[ScoredSample], dict[str, float]]:
    """Roll out prompts until the train batch is full, then trim it to ``train.global_batch_size``
    whole groups (first rank).

    Without dynamic sampling one round of ``rollout.batch_size`` prompts (or the few a larger train
    batch needs) fills the batch. With it, the groups the filter drops (all scores equal, or a
    mean outside ``algorithm.dynamic_sampling_mean_range``) wait in reserve, and each round
    generates, in one call, the loader batches that the samples still missing will likely need at
    the running keep rate (:attr:`Run.keep_rate <megarl.trainer.run.Run.keep_rate>`; verl: a
    generation batch larger than the train batch, slime: over-sampling); a round that falls short
    is followed by another sized the same way. When ``algorithm.max_num_gen_batches`` times the
    prompts a batch needs are spent, the batch is topped up from the reserve rather than train on
    fewer samples (``filter/topped_up_samples`` counts them; under a group baseline an all-equal
    group has advantage 0 and moves no weight). After each round the fraction of the step's groups
    kept so far updates the keep rate (:data:`KEEP_RATE_MEMORY`) that sizes the next round and,
    at the end of the step, the next step's first.

    Returns:
        ``(samples, metrics)``; ``reward/*`` describe every sample generated in the step,
        ``rollout/rounds`` counts the generation calls, ``rollout/prompts`` their prompts.
    """
    config = run.config
    target = config.train.global_batch_size
    n, batch_size = config.rollout.n_samples_per_prompt, config.rollout.batch_size
    dynamic = config.algorithm.dynamic_sampling
    budget = -(-target // (batch_size * n)) * (config.algorithm.max_num_gen_batches if dynamic else 1)
    kept: list[ScoredSample] = []
    reserve: list[ScoredSample] = []
    generated_scores: list[float] = []
    metrics: dict[str, float] = {"filter/keep_rate": run.keep_rate} if dynamic else {}
    spent = rounds = 0
    keep_rate = run.keep_rate if dynamic else 1.0
    while len(kept) < target and spent < budget:
        batches = min(round_batches(target - len(kept), n, batch_size, keep_rate), budget - spent)
        round_metrics, samples = generate_round(run, step, rounds, batches=batches, first_group=spent * batch_size)
        spent, rounds = spent + batches, rounds + 1
        add_round_metrics(metrics, round_metrics)
        scores = torch.tensor([sample.score for sample in samples])
        generated_scores += scores.tolist()
        if dynamic:
            groups = torch.tensor([sample.group for sample in samples])
            keep, counts = dynamic_sampling_keep(scores, groups, mean_range=config.algorithm.dynamic_sampling_mean_range)
            reserve += [sample for sample, kept_sample in zip(samples, keep.tolist()) if not kept_sample]
            samples = [sample for sample, kept_sample in zip(samples, keep.tolist()) if kept_sample]
            for name, value in counts.items():
                metrics[f"filter/{name}"] = metrics.get(f"filter/{name}", 0) + value
            keep_rate = KEEP_RATE_MEMORY * metrics["filter/groups_kept"] / metrics["filter/groups"] + (1 - KEEP_RATE_MEMORY) * run.keep_rate
        kept += samples
    if dynamic:
        run.keep_rate = keep_rate
    generated = torch.tensor(generated_scores)
    metrics.update({"reward/mean": generated.mean().item(), "reward/std": generated.std().item(), "rollout/rounds": rounds})
    if len(kept) < target:
        # Reserve samples come in whole groups, as the batch needs them.
        metrics["filter/topped_up_samples"] = target - len(kept)
        kept += reserve[: target - len(kept)]
    return kept[:target], metrics


_WIRE_KINDS = (torch.int64, torch.float32, torch.uint8)
"""The buffers :func:`share_batch` broadcasts: integers, floats, and bytes (the routed experts of
models with up to 256 experts, ``B x S x layers x k`` values, sent without widening them)."""


def _wire_kind(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_floating_point:
        return torch.float32
    return torch.uint8 if dtype == torch.uint8 else torch.int64


def share_batch(run: Run, work) -> tuple[TrainBatch, torch.Tensor, dict[str, float]]:
    """Run ``work() -> (batch, scores, metrics)`` on the first rank and give the result to every
    rank: a small header through :func:`on_first_rank` (each tensor's name, shape and dtype, the
    metrics, the keep rate; or the first rank's error, raised on every rank), then the batch's
    tensors and the scores packed into one int64, one float32 and one uint8 buffer, each sent with
    one broadcast."""
    buffers: list[torch.Tensor] = []

    def header():
        batch, scores, metrics = work()
        named = {**batch.tensors(), "scores": scores.float()}
        for kind in _WIRE_KINDS:
            parts = [tensor.reshape(-1).to(kind) for tensor in named.values() if _wire_kind(tensor.dtype) == kind]
            buffers.append(torch.cat(parts) if parts else torch.empty(0, dtype=kind))
        layout = [(name, _WIRE_KINDS.index(_wire_kind(tensor.dtype)), tuple(tensor.shape), tensor.dtype) for name, tensor in named.items()]
        return layout, [buffer.numel() for buffer in buffers], batch.pad_multiple, metrics, run.keep_rate

    layout, sizes, pad_multiple, metrics, run.keep_rate = on_first_rank(run, header)
    if not buffers:
        buffers = [torch.empty(size, dtype=kind) for size, kind in zip(sizes, _WIRE_KINDS)]
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
    offsets, named = [0] * len(_WIRE_KINDS), {}
    for name, wire, shape, dtype in layout:
        count = math.prod(shape)
        named[name] = buffers[wire][offsets[wire] : offsets[wire] + count].reshape(shape).to(dtype)
        offsets[wire] += count
    scores = named.pop("scores")
    return TrainBatch.from_tensors(named, pad_multiple=pad_multiple), scores, metrics


def train_step(run: Run, step: int, phase=lambda name: None) -> dict[str, float]:
    """One RL step; returns its metrics (the same on every rank).

    Args:
        run: everything the run holds (models, engines, scorer, data); changed in place (weights,
            data position, controllers).
        step: the step's index (it seeds the sampling and the mini-batch shuffling).
        phase: called with the name of each phase as it starts (the progress bar's label).
    """
    config = run.config
    start = time.perf_counter()
    phase("rollout")
    # train.offload: the trained state is on the host while the engines generate (moved there
    # after the previous sync, and here before the first step or after a checkpoint save).
    run.offload.to_host()
    batch, scores, metrics, texts = collect_batch(run, step)
    colocated = run.engines is not None and config.rollout.colocate
    if colocated:
        # The engines share the devices with training: they give their memory back until the sync.
        run.engines.release_memory()
    rolled_out = time.perf_counter()
    phase("forward")
    run.offload.to_device()

    old_values, router_metrics = run.policy.old_log_probs(batch)
    batch.token_values.update(old_values)
    metrics.update(router_metrics)
    if run.teacher_model is not None:
        metrics.update(run.teacher_model.score(batch))
    if run.reference is not None:
        with run.reference.swapped_in():
            batch.token_values["ref_log_probs"] = run.policy.reference_log_probs(batch)
    if run.critic is not None:
        batch.token_values["values"] = run.critic.values(batch)
    forwarded = time.perf_counter()
    phase("update")

    metrics.update(
        prepare_update(batch, scores, config.algorithm, run.reward_moments, run.kl_controller, max_response_length=config.data.max_response_length)
    )
    if texts:
        # The advantages are known from here; the texts only on the first rank.
        records = rollout_records(step, texts, scores, batch, config.data.train_files)
        write_generations(config.logging.generations_dir(config.logging.rollout_dir), step, records)
        run.logger.log_table(step, "generations/rollout", records[:SHOWN])

    if run.critic is not None:
        metrics.update(run.critic.update(batch, step))
        _stop_on_non_finite(run, step, "critic", run.critic.consecutive_skips)
    if run.critic is None or step >= config.critic.warmup_steps:
        metrics.update(run.policy.update(batch, step))
        _stop_on_non_finite(run, step, "policy", run.policy.consecutive_skips)
    updated = time.perf_counter()
    phase("weight sync")

    if colocated:
        run.engines.resume_memory(["weights"])
    with run.rollout.weight_update(step + 1) if run.rollout is not None else contextlib.nullcontext():
        metrics.update(run.sync_weights(version=step + 1))
    # Before the engines take their KV cache back: it fills the memory the trained state leaves.
    run.offload.to_host()
    metrics.update(run.offload.metrics())
    if colocated:
        run.engines.resume_memory()
    if config.rollout.colocate:
        # The first rank generates on every node's engines next: all must have their memory back.
        run.wait_for_nodes()
    end = time.perf_counter()
    tokens = int(batch.sequence_lengths.sum())
    metrics.update(
        {
            "time/rollout_s": rolled_out - start,
            "time/forward_s": forwarded - rolled_out,
            "time/update_s": updated - forwarded,
            "time/step_s": end - start,
            "throughput/tokens_per_s": tokens / (end - start),
            "throughput/samples_per_s": batch.size / (end - start),
        }
    )
    return metrics


def _stop_on_non_finite(run: Run, step: int, model: str, skips: int) -> None:
    limit = run.config.train.max_consecutive_nan_steps
    if skips >= limit:
        raise TrainingStopped(
            f"step {step}: {skips} {model} optimizer steps in a row had non-finite gradients "
            f"(train.max_consecutive_nan_steps = {limit}); the last good checkpoint "
            f"is under {run.checkpoint_dir}: lower the learning rate or inspect the data"
        )


def evaluate(run: Run, step: int, *, logged_at: int | None = None) -> dict[str, float]:
    """The validation metrics of the policy after step ``step`` (``-1``: the initial one), computed
    on the first rank (:func:`megarl.trainer.validation.validate`) and given to every rank;
    ``logged_at``: the metrics row they go to (default ``step``)."""
    return on_first_rank(run, lambda: validate(run, step, logged_at=step if logged_at is None else logged_at))


def fit(run: Run) -> None:
    """Run the steps from ``run.start_step`` to ``train.steps``, with validation and checkpoints.

    The first rank shows a progress bar over the steps whose label names the phase under way, on a
    terminal only (in a log file the per-step lines say the same without the redraws). The run
    directory gets the config once training starts (``config.yaml``; ``config.step_N.yaml`` for a
    run resumed at step N), so that a start that fails leaves the record of the last run as it was.
    With ``train.val_only`` it validates and trains nothing (:func:`validate_only`).

    Raises:
        Interrupted: on Ctrl-C, naming the step under way (or the final export).
    """
    config = run.config
    if config.train.val_only:
        validate_only(run)
        return
    if run.start_step >= config.train.steps:
        length = "train.steps" if config.train.total_epochs is None else "train.total_epochs"
        log.info(
            "the run in %s is complete (train.steps = %d): raise %s to go on, or set checkpoint.resume=never to start over",
            run.run_dir, config.train.steps, length,
        )
        return
    run.logger.start(run.start_step)
    if run.rollout is not None:
        run.rollout.start()
    if run.is_first_rank:
        given = config
        if config.train.total_epochs is not None:
            # As given: the steps follow from the epochs (resolve_steps), so the file loads again.
            given = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=None))
        save_config(given, run.run_dir / (f"config.step_{run.start_step}.yaml" if run.start_step else "config.yaml"))
    progress = tqdm(total=config.train.steps, initial=run.start_step, unit="step", disable=not (run.is_first_rank and sys.stderr.isatty()), dynamic_ncols=True)
    step = run.start_step
    eval_every = config.train.eval_every if run.val_set is not None else 0
    try:
        with progress:
            before_train = {}
            if run.val_set is not None and config.train.val_before_train:
                progress.set_description("validation before training")
                started = time.perf_counter()
                before_train = {f"{name}_before_train": value for name, value in evaluate(run, step - 1, logged_at=step).items()}
                before_train["time/validation_before_train_s"] = time.perf_counter() - started
            for step in range(run.start_step, config.train.steps):
                metrics = train_step(run, step, lambda phase: progress.set_description(f"step {step}: {phase}"))
                metrics.update(before_train)
                before_train = {}
                last = step == config.train.steps - 1
                if eval_every and ((step + 1) % eval_every == 0 or last):
                    progress.set_description(f"step {step}: validation")
                    started = time.perf_counter()
                    metrics.update(evaluate(run, step))
                    metrics["time/validation_s"] = time.perf_counter() - started
                run.logger.log(step, metrics)
                if (config.checkpoint.save_every and (step + 1) % config.checkpoint.save_every == 0) or last:
                    progress.set_description(f"step {step}: checkpoint")
                    run.save(step)
                progress.update(1)
                progress.set_postfix({"reward": f"{metrics['reward/mean']:.3f}"})
    except KeyboardInterrupt:
        raise Interrupted(f"step {step}") from None
    if config.checkpoint.save_hf:
        try:
            log.info("exported the final policy to %s", run.export_hf())
        except KeyboardInterrupt:
            raise Interrupted("the HF export after the last step (the run itself is complete)") from None
    if run.is_first_rank:
        log.info("%s", finish_run(run.run_dir, launched_at=run.launched_at, start_step=run.start_step))


def validate_only(run: Run) -> None:
    """``train.val_only``: validate the policy as set up (resumed from ``checkpoint.resume``'s
    checkpoint: the policy after step ``start_step - 1``), log its metrics with
    ``time/validation_s`` as the row of step ``start_step`` (the step a run would train next; a
    training run that goes on from the same checkpoint sets that row aside, as it does every row
    from its first step on), and stop: no step, no checkpoint, no config file.

    Raises:
        Interrupted: on Ctrl-C.
    """
    run.logger.start(run.start_step)
    started = time.perf_counter()
    try:
        metrics = evaluate(run, run.start_step - 1, logged_at=run.start_step)
    except KeyboardInterrupt:
        raise Interrupted("validation (train.val_only)") from None
    metrics["time/validation_s"] = time.perf_counter() - started
    run.logger.log(run.start_step, metrics)
    if run.is_first_rank:
        log.info(
            "train.val_only: the policy after step %d validated, nothing trained: %s",
            run.start_step - 1, ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if name.startswith("val/")),
        )
