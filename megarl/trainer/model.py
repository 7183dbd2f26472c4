"""A trainable Megatron model: chunks, Megatron's DDP, optimizer, schedule, and the schedule runner.

The policy and the critic are both one of these. :meth:`TrainModel.run` feeds a list of
micro-batches through Megatron's ``forward_backward_func`` (1F1B, interleaved with VPP, or no
pipelining), :meth:`TrainModel.optimizer_step` takes the step when every rank's gradients are
finite and skips it (zeroing them) otherwise.

Loss normalisation. The models are built with ``calculate_per_token_loss`` (see
:func:`megarl.models.builder.model_spec`): a loss function returns ``(loss_sum, count, metrics)``,
Megatron adds the ``count`` of every micro-batch, all-reduces it over the data- and
context-parallel ranks and divides the summed gradients by it. So a micro-batch returns the *sum*
of its per-sample loss contributions and its share of the normaliser, and the gradient is that of
the whole mini-batch loss whatever the split into micro-batches and ranks
(:mod:`megarl.algorithms.aggregation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist

from megarl.algorithms.aggregation import aggregate_loss, normalizer
from megarl.config import OptimizerConfig, ParallelConfig, TrainConfig
from megarl.data.batching import plan_micro_batches
from megarl.models.builder import ModelSpec, build_model, model_spec
from megarl.models.loader import load_hf_config, load_hf_weights
from megarl.models.specs import Backend
from megarl.platform import current_device
from megarl.trainer.batch import TrainBatch
from megarl.trainer.optim import build_optimizer, build_scheduler


@dataclasses.dataclass
class TrainModel:
    """One model under training on this rank.

    Attributes:
        spec: the HF config and Megatron's TransformerConfig.
        chunks: this rank's GPTModel chunks (one per virtual pipeline stage), unwrapped.
        models: the same chunks inside Megatron's DistributedDataParallel.
        optimizer: Megatron's optimizer over ``models``.
        scheduler: Megatron's learning-rate schedule.
        pg_collection: the process groups.
        train: how batches are cut into micro-batches (``micro_batch_size`` or a token budget).
        consecutive_skips: optimizer steps skipped in a row for non-finite gradients (the run
            stops at ``train.max_consecutive_nan_steps``; checkpointed with the train state).
    """

    spec: ModelSpec
    chunks: list
    models: list
    optimizer: Any
    scheduler: Any
    pg_collection: Any
    train: TrainConfig
    consecutive_skips: int = 0

    @classmethod
    def build(
        cls,
        hf_path: str,
        layout: ParallelConfig,
        pg_collection,
        train: TrainConfig,
        *,
        dtype: torch.dtype,
        backend: Backend,
        optimizer_config: OptimizerConfig,
        lr_schedule: str,
        warmup_steps: int,
        total_steps: int,
        use_distributed_optimizer: bool,
        transformer_overrides: dict[str, Any] | None = None,
        after_load: Callable[[list, ModelSpec], None] | None = None,
    ) -> TrainModel:
        """Build the chunks for ``layout``, load the HF weights and wrap them for training.

        Args:
            hf_path: the HF model directory the weights come from.
            layout: the parallel layout.
            pg_collection: from :func:`megarl.parallel.initialize`.
            train: the micro-batching settings.
            dtype: parameter dtype.
            backend: layer specs, ``te`` or ``torch``.
            optimizer_config: Adam settings.
            lr_schedule: ``constant``, ``linear`` or ``cosine``.
            warmup_steps: optimizer steps of warm-up.
            total_steps: optimizer steps of the run.
            use_distributed_optimizer: shard the optimizer state over data-parallel ranks.
            transformer_overrides: further TransformerConfig fields (recompute, MoE settings).
            after_load: called with ``(chunks, spec)`` after the HF weights are in, before the
                chunks are wrapped (the critic swaps its output layer for a value head there).
        """
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        spec = model_spec(load_hf_config(hf_path), layout, dtype, **(transformer_overrides or {}))
        chunks = build_model(spec, backend, pg_collection)
        load_hf_weights(chunks, spec, pg_collection, hf_path)
        if after_load is not None:
            after_load(chunks, spec)
        config = spec.transformer_config
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        models = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection) for chunk in chunks]
        optimizer = build_optimizer(
            models, optimizer_config, dtype=dtype, use_distributed_optimizer=use_distributed_optimizer
        )
        # The optimizer's fp32 main weights are copies made at construction; refresh them from the
        # loaded (and possibly modified) model weights.
        optimizer.reload_model_params()
        scheduler = build_scheduler(optimizer, optimizer_config, style=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps)
        return cls(
            spec=spec, chunks=chunks, models=models, optimizer=optimizer, scheduler=scheduler, pg_collection=pg_collection, train=train
        )

    @property
    def is_last_stage(self) -> bool:
        return self.pg_collection.pp.rank() == self.pg_collection.pp.size() - 1

    def micro_batches(self, batch: TrainBatch, rows: torch.Tensor, fields) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``rows`` (indices into ``batch``), with the token values
        named in ``fields``; every data-parallel rank gets the same number of them.

        Each also carries ``row_response_mask [b, S']``: the whole rows' masks, for normalisers
        that must see whole responses under context parallelism.
        """
        rows = rows.tolist()
        lengths = [int(batch.sequence_lengths[row]) for row in rows]
        plan = plan_micro_batches(lengths, self.pg_collection.dp.size(), self.train)[self.pg_collection.dp.rank()]
        cp_rank, cp_size = self.pg_collection.cp.rank(), self.pg_collection.cp.size()
        micro_batches = []
        for indices in plan:
            micro = batch.micro_batch([rows[index] for index in indices], fields, cp_rank=cp_rank, cp_size=cp_size)
            micro["row_response_mask"] = batch.response_mask[micro["rows"]]
            micro_batches.append(micro)
        return micro_batches

    def reduce_sums(self, outputs: list[dict[str, Any]], size: int) -> torch.Tensor:
        """Add the ``sums [size]`` each micro-batch's loss function reported over micro-batches and
        data- and context-parallel ranks, and share them with every pipeline stage.

        Returns:
            ``[size]`` float64 on the CPU, the same on every rank.
        """
        sums = torch.zeros(size, dtype=torch.float64, device=current_device())
        for output in outputs:
            sums += output["sums"].to(sums.device)
        if self.pg_collection.dp_cp.size() > 1:
            dist.all_reduce(sums, group=self.pg_collection.dp_cp)
        if self.pg_collection.pp.size() > 1:
            # Only the last stage computed losses; the others add zeros.
            dist.all_reduce(sums, group=self.pg_collection.pp)
        return sums.cpu()

    def run(self, micro_batches: list[dict[str, torch.Tensor]], forward_step: Callable, *, forward_only: bool) -> list:
        """Feed ``micro_batches`` through Megatron's pipeline schedule.

        Args:
            micro_batches: this rank's micro-batches, each a dict with at least ``tokens [b, s]``;
                every data-parallel rank passes the same number of them.
            forward_step: ``forward_step(data_iterator, model) -> (output, loss_func)``.
            forward_only: no backward (log-prob and value passes); the loss functions are then
                called with ``non_loss_data=True`` and what they return is collected.

        Returns:
            On the last pipeline stage, what each micro-batch's loss function returned
            (its metrics when training); an empty list on other stages.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if forward_only:
            for chunk in self.models:
                chunk.eval()
        else:
            for chunk in self.models:
                chunk.train()
        iterators = [iter(micro_batches) for _ in self.models]
        sequence_length = max(batch["tokens"].shape[1] for batch in micro_batches)
        micro_batch_size = max(batch["tokens"].shape[0] for batch in micro_batches)
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.models if len(self.models) > 1 else self.models[0],
                num_microbatches=len(micro_batches),
                seq_length=sequence_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
                collect_non_loss_data=forward_only,
            )

    def update(
        self, batch: TrainBatch, fields, forward_step: Callable, num_sums: int, seed: int, summarize: Callable[[torch.Tensor], dict[str, float]]
    ) -> dict[str, float]:
        """Train on ``batch``: ``train.ppo_epochs`` passes, each over the batch shuffled (seeded)
        and cut into mini-batches of ``train.mini_batch_size`` samples, one optimizer step each.

        Args:
            batch: the step's samples, with the token values the loss reads.
            fields: the token values the loss needs (:meth:`micro_batches`).
            forward_step: Megatron's forward step; its loss function reports ``sums [num_sums]``.
            num_sums: the length of those sums.
            seed: the shuffling seed (the RL step's).
            summarize: a mini-batch's ``sums`` -> its metrics.

        Returns:
            The metrics of ``summarize`` and ``grad_norm``, ``lr`` averaged over the mini-batches,
            and ``skipped_steps``, the optimizer steps skipped for non-finite gradients.
        """
        generator = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        mini_batches = 0
        for _ in range(self.train.ppo_epochs):
            order = torch.randperm(batch.size, generator=generator)
            for start in range(0, batch.size, self.train.mini_batch_size):
                rows = order[start : start + self.train.mini_batch_size]
                outputs = self.run(self.micro_batches(batch, rows, fields), forward_step, forward_only=False)
                metrics = summarize(self.reduce_sums(outputs, num_sums))
                stepped, grad_norm = self.optimizer_step()
                self.consecutive_skips = 0 if stepped else self.consecutive_skips + 1
                metrics.update({"grad_norm": grad_norm, "lr": self.learning_rate, "skipped_steps": 0.0 if stepped else 1.0})
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + value
                mini_batches += 1
        averaged = {name: value / mini_batches for name, value in totals.items()}
        averaged["skipped_steps"] = totals["skipped_steps"]
        return averaged

    def zero_grad(self) -> None:
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def gradients_finite(self) -> bool:
        """Whether every rank's gradient buffers hold only finite values (a collective)."""
        finite = all(
            bool(torch.isfinite(buffer.grad_data).all())
            for model in self.models
            for buffer in model.buffers + model.expert_parallel_buffers
        )
        flag = torch.tensor([1.0 if finite else 0.0], device=current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def optimizer_step(self) -> tuple[bool, float]:
        """Step the optimizer and the schedule when the gradients are finite on every rank.

        Returns:
            ``(stepped, grad_norm)``: a skipped step leaves the weights, the optimizer state and
            the schedule as they were, zeroes the gradients and reports grad_norm NaN.
        """
        if not self.gradients_finite():
            self.zero_grad()
            return False, float("nan")
        stepped, grad_norm, _ = self.optimizer.step()
        if stepped:
            self.scheduler.step(increment=1)
        self.zero_grad()
        return bool(stepped), float(grad_norm) if grad_norm is not None else 0.0

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def aggregate_micro_batch(
    per_token_loss: torch.Tensor, micro: dict[str, torch.Tensor], mode: str, max_response_length: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's ``(loss_sum, count)`` for Megatron's per-token loss normalisation.

    ``loss_sum`` is the sum of the micro-batch's contributions under ``mode``
    (:func:`megarl.algorithms.aggregation.aggregate_loss` with a normaliser of 1) and ``count`` its
    share of the normaliser Z. With context parallelism this rank holds part of each response: the
    whole rows' masks (``micro["row_response_mask"]``) give the per-response token counts, and the
    first context-parallel rank alone counts Z, so that the sum over ranks is the mini-batch's.

    Args:
        per_token_loss: ``[b, s]`` on this rank's columns.
        micro: the micro-batch (``response_mask``, ``row_response_mask``).
        mode: ``algorithm.loss_agg_mode``.
        max_response_length: L of the ``seq-mean-token-sum-norm`` normaliser.
        cp_rank: this rank in the context-parallel group.

    Returns:
        ``(loss_sum, count)``: a differentiable 0-d tensor, and a 0-d int tensor.
    """
    row_mask = micro["row_response_mask"]
    loss_sum = aggregate_loss(per_token_loss, micro["response_mask"], mode, 1.0, sequence_lengths=row_mask.sum(-1))
    count = normalizer(mode, row_mask, max_response_length) if cp_rank == 0 else torch.zeros((), dtype=torch.float64)
    return loss_sum, count.to(device=loss_sum.device, dtype=torch.int)
