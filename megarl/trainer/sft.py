"""Supervised fine-tuning on the RL trainer's stack: :func:`setup_sft` builds the run, :func:`fit_sft`
trains it.

The model is a :class:`~megarl.trainer.model.TrainModel`, as the policy is: the same layouts,
micro-batching and packing (``train.packing``), optimizer, schedule and non-finite step skipping.
A step takes ``train.global_batch_size`` conversations (:mod:`megarl.data.conversations`) and
packs them into a :class:`~megarl.trainer.batch.TrainBatch` whose "prompt" is the context before
the first assistant token and whose "response" is the rest, with the loss mask on the assistant
tokens only; :meth:`TrainModel.update` trains on it with :class:`SupervisedObjective`, the negative
log-likelihood of the assistant tokens averaged over every assistant token of the mini-batch
(``token-mean``, whatever the split into micro-batches and ranks).

Checkpoints are the RL run's (:mod:`megarl.checkpoint`: the conversion tools read them, and
``checkpoint.resume`` goes on from them); ``checkpoint.save_hf`` exports the final model as a HF
directory, which an RL run takes as its ``model.path``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

from megarl import checkpoint, parallel, platform
from megarl.resume import agreed_resume
from megarl.config import ModelFacts, layout_multiple, resolve_model_path, save_config
from megarl.config.sft import SFTConfig, validate_sft
from megarl.data.conversations import Conversation, ConversationLoader, load_conversations
from megarl.metrics import MetricsLogger
from megarl.models.specs import choose_backend
from megarl.trainer.batch import TrainBatch
from megarl.trainer.model import TrainModel
from megarl.trainer.objective import ModelObjective, aggregate_micro_batch
from megarl.trainer.policy import attach_hidden_states_heads, token_log_probs_and_entropy

log = logging.getLogger("megarl")


class NonFiniteSteps(RuntimeError):
    """``train.max_consecutive_nan_steps`` optimizer steps in a row had non-finite gradients."""


class SupervisedObjective(ModelObjective):
    """The negative log-likelihood of the assistant tokens, the update's
    :class:`~megarl.trainer.objective.Objective`: per micro-batch the sum of ``-log p(token)`` over
    its assistant tokens (``response_mask``) and their count, so that the gradient is that of the
    mean over the mini-batch's assistant tokens (verl's SFT loss with ``token-mean``).

    Args:
        model: the model under training (built with :func:`attach_hidden_states_heads` when
            ``fused_linear_logprob``).
        fused_linear_logprob: ``train.fused_linear_logprob``.
    """

    fields: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    def __init__(self, model: TrainModel, *, fused_linear_logprob: bool):
        self.model = model
        self.fused_linear_logprob = fused_linear_logprob

    def loss(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        log_probs, _ = token_log_probs_and_entropy(self.model, output, micro, temperature=1.0, fused_linear_logprob=self.fused_linear_logprob)
        # token-mean's normaliser is the token count: the response length budget is not read.
        loss_sum, count = aggregate_micro_batch(-log_probs, micro, "token-mean", 0, self.model.pg_collection.cp.rank())
        return loss_sum, count, {}


def conversation_batch(conversations: list[Conversation], *, pad_token_id: int, pad_multiple: int) -> TrainBatch:
    """The conversations as a :class:`TrainBatch`: each its context before the first assistant
    token as the prompt, the rest as the response, trained on its assistant tokens only. The
    batch's ``rollout_log_probs`` are zeros (nothing was sampled; the objective reads none)."""
    prompts = [conversation.token_ids[: conversation.context_length] for conversation in conversations]
    responses = [conversation.token_ids[conversation.context_length :] for conversation in conversations]
    return TrainBatch.from_samples(
        prompts,
        responses,
        [[0.0] * len(response) for response in responses],
        range(len(conversations)),
        [False] * len(conversations),
        pad_token_id=pad_token_id,
        pad_multiple=pad_multiple,
        loss_masks=[conversation.loss_mask[conversation.context_length :] for conversation in conversations],
    )


@dataclasses.dataclass
class SFTRun:
    """A fine-tuning run's state on one rank.

    Attributes:
        config: the resolved config (``train.steps`` set).
        run_dir: where metrics, the config and (by default) checkpoints go.
        model: the model under training.
        objective: its loss.
        loader: the conversations, resumable.
        pad_token_id: written into padding.
        logger: the metric sinks (writes on the first rank only).
        start_step: the first step to run (after a resume, the step after the checkpoint's).
    """

    config: SFTConfig
    run_dir: Path
    model: TrainModel
    objective: SupervisedObjective
    loader: ConversationLoader
    pad_token_id: int
    logger: MetricsLogger
    start_step: int = 0

    @property
    def is_first_rank(self) -> bool:
        return dist.get_rank() == 0

    def save(self, step: int) -> Path:
        """Save a checkpoint after ``step`` (collective), in the RL checkpoints' format."""
        config = self.config
        return checkpoint.save_checkpoint(
            config.resolved_checkpoint_dir(), step, self.model.models, self.model.optimizer, self.model.scheduler,
            train_state={
                "data": self.loader.state_dict(), "consecutive_skips": self.model.consecutive_skips,
                "freeze_moe_router": config.model.freeze_moe_router,
            },
            hf_dir=resolve_model_path(config.model.path), tokenizer_dir=config.model.tokenizer_path, keep_last=config.checkpoint.keep_last,
        )

    def export_hf(self) -> Path:
        """Write the model as a HF model directory, ``<run_dir>/hf`` (collective)."""
        return self.model.export_hf(self.run_dir / "hf", self.config.model)

    def close(self) -> None:
        self.logger.close()


def setup_sft(config: SFTConfig) -> SFTRun:
    """Build the run on this rank: process groups, conversations, model, sinks; resume from a
    checkpoint when ``checkpoint.resume`` finds one. With ``train.total_epochs`` it sets
    ``train.steps`` to the epochs' steps once the conversations are counted.

    Raises:
        ConfigError: the config does not fit the world size or the model.
        DataError: a dataset row that cannot be used (naming file and row).
    """
    detected = platform.init_distributed()
    model_dir = resolve_model_path(config.model.path)
    world_size = dist.get_world_size()
    validate_sft(config, world_size, ModelFacts.from_hf_dir(model_dir))
    pg_collection = parallel.initialize(config.parallel)
    parallel.seed(config.model.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(config.model.tokenizer_path or model_dir), local_files_only=True)
    conversations = load_conversations(config.data, tokenizer)
    train = config.train
    if train.steps is None:
        train.steps = train.total_epochs * math.ceil(len(conversations) / train.global_batch_size)
    backend = choose_backend(
        config.model.attention_backend, detected.has_transformer_engine, packed_fp32=train.packing and config.model.dtype == "fp32"
    )
    model = TrainModel.build(
        str(model_dir), config.model, config.parallel, train, train.optimizer, pg_collection=pg_collection, backend=backend,
        after_load=attach_hidden_states_heads if train.fused_linear_logprob else None,
    )
    first = dist.get_rank() == 0
    run_dir = config.logging.resolved_run_dir()
    run = SFTRun(
        config=config,
        run_dir=run_dir,
        model=model,
        objective=SupervisedObjective(model, fused_linear_logprob=train.fused_linear_logprob),
        loader=ConversationLoader(conversations, train.global_batch_size, shuffle=config.data.shuffle, seed=config.data.seed),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        logger=MetricsLogger(config.logging, run_dir, enabled=first, run_settings=config.to_dict()),
    )
    log.info(
        "%d processes on %s; %d conversations; layout TP %d, PP %d, CP %d, EP %d, DP %d", world_size, detected.device.type,
        len(conversations), config.parallel.tensor, config.parallel.pipeline, config.parallel.context, config.parallel.expert,
        config.parallel.data_parallel(world_size),
    )
    resume_from, contents = agreed_resume(config.checkpoint.resume, config.resolved_checkpoint_dir(), config.checkpoint.load_contents)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, model.models, model.optimizer, model.scheduler, contents=contents)
        if contents == "all":
            run.loader.load_state_dict(state["data"])
            model.consecutive_skips = state["consecutive_skips"]
            run.start_step = state["step"] + 1
        log.info(
            "resumed from %s: the run goes on at step %d" if contents == "all" else "loaded the weights of %s: a new run starts at step %d",
            resume_from, run.start_step,
        )
    return run


def sft_step(run: SFTRun, step: int) -> dict[str, Any]:
    """Train on the next ``train.global_batch_size`` conversations; the step's metrics."""
    started = time.perf_counter()
    parallel_config = run.config.parallel
    batch = conversation_batch(
        next(run.loader), pad_token_id=run.pad_token_id,
        pad_multiple=layout_multiple(parallel_config.tensor, parallel_config.sequence_parallel, parallel_config.context),
    )
    update = run.model.update(batch, run.objective, seed=run.config.train.seed * 1_000_003 + step)
    seconds = time.perf_counter() - started
    tokens = int(batch.sequence_lengths.sum())
    return {
        **{f"sft/{name}": value for name, value in update.items()},
        "sft/assistant_tokens": int(batch.response_mask.sum()),
        "perf/tokens_per_s": tokens / max(seconds, 1e-9),
        "time/step_s": seconds,
    }


def fit_sft(run: SFTRun) -> None:
    """Run the steps from ``run.start_step`` to ``train.steps``, saving every
    ``checkpoint.save_every`` steps and after the last; then, with ``checkpoint.save_hf``, export
    the model.

    Raises:
        NonFiniteSteps: ``train.max_consecutive_nan_steps`` steps in a row were skipped.
    """
    config = run.config
    if run.start_step >= config.train.steps:
        log.info("the run in %s is complete (train.steps = %d): raise it to go on, or set checkpoint.resume=never", run.run_dir, config.train.steps)
        return
    run.logger.start(run.start_step)
    if run.is_first_rank:
        save_config(config, run.run_dir / (f"config.step_{run.start_step}.yaml" if run.start_step else "config.yaml"))
    for step in range(run.start_step, config.train.steps):
        metrics = sft_step(run, step)
        run.logger.log(step, metrics)
        if run.model.consecutive_skips >= config.train.max_consecutive_nan_steps:
            raise NonFiniteSteps(
                f"step {step}: {run.model.consecutive_skips} optimizer steps in a row had non-finite gradients "
                f"(train.max_consecutive_nan_steps): lower train.optimizer.lr or check the data"
            )
        last = step == config.train.steps - 1
        if (config.checkpoint.save_every and (step + 1) % config.checkpoint.save_every == 0) or last:
            path = run.save(step)
            log.info("step %d: saved %s", step, path)
    if config.checkpoint.save_hf:
        log.info("exported the model to %s", run.export_hf())
