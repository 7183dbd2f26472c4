"""A trainable Megatron model: chunks, Megatron's DDP, optimizer, schedule, and the schedule runner.

The policy and the critic are both one of these. :meth:`TrainModel.update` trains it on an
:class:`~megarl.trainer.objective.Objective` and :meth:`TrainModel.forward` runs a pass without
gradients; both feed micro-batches through Megatron's ``forward_backward_func`` (1F1B, interleaved
with VPP, or no pipelining) with the model's one forward step (``TrainModel._forward_step``).
:meth:`TrainModel.optimizer_step` takes the step when every rank's gradients are finite and skips
it (zeroing them) otherwise.

Loss normalisation. The models are built with ``calculate_per_token_loss`` (see
:func:`megarl.models.builder.model_spec`): an objective's loss returns ``(loss_sum, count,
sums)``, Megatron adds the ``count`` of every micro-batch, all-reduces it over the data- and
context-parallel ranks and divides the summed gradients by it. So a micro-batch returns the *sum*
of its per-sample loss contributions and its share of the normaliser, and the gradient is that of
the whole mini-batch loss whatever the split into micro-batches and ranks
(:mod:`megarl.algorithms.aggregation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megarl.config import ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig, resolve_model_path
from megarl.models.builder import DTYPES, ModelSpec, build_model, model_spec
from megarl.models.loader import load_hf_config, load_hf_weights
from megarl.models.specs import Backend
from megarl.models.thd import HOST_BOUNDS_ATTRIBUTE
from megarl.platform import current_device
from megarl.trainer.batch import TrainBatch, gather_token_values
from megarl.trainer.micro_batches import rank_micro_batches
from megarl.trainer.objective import Objective
from megarl.trainer.optim import build_optimizer, build_scheduler
from megarl.trainer.routing import Routers, freeze_routers

UPDATE_SUMS = ("loss_sum", "count", "tokens")
"""What an update adds up for every objective besides the objective's own metrics: the loss sum,
its normaliser, and the valid response tokens the metrics are averaged over."""


@dataclasses.dataclass
class TrainModel:
    """One model under training on this rank.

    Attributes:
        spec: the HF config and Megatron's TransformerConfig.
        chunks: this rank's GPTModel chunks (one per virtual pipeline stage), unwrapped.
        models: the same chunks inside Megatron's DistributedDataParallel (the chunks themselves
            built by :meth:`build_forward_only`, whose optimizer and scheduler are None).
        optimizer: Megatron's optimizer over ``models``.
        scheduler: Megatron's learning-rate schedule.
        pg_collection: the process groups.
        train: how batches are cut into mini- and micro-batches, and the epochs over them.
        routers: the MoE routers (routing replay and router metrics); None for a dense model.
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
    routers: Routers | None = None
    consecutive_skips: int = 0

    @classmethod
    def build(
        cls,
        hf_path: str,
        model: ModelConfig,
        layout: ParallelConfig,
        train: TrainConfig,
        optimizer: OptimizerConfig,
        *,
        pg_collection,
        backend: Backend,
        after_load: Callable[[list, ModelSpec], None] | None = None,
        routing_replay: bool = False,
    ) -> TrainModel:
        """Build the chunks for ``layout``, load the HF weights and wrap them for training.

        Args:
            hf_path: the HF model directory the weights come from.
            model: the parameter dtype, the TransformerConfig fields it sets (recompute, MoE
                settings) and whether the MoE routers are frozen
                (:func:`~megarl.trainer.routing.freeze_routers`); its ``path`` is not read (``hf_path`` is).
            layout: the parallel layout.
            train: the micro-batching, the learning-rate schedule over the run's optimizer steps,
                and whether the optimizer state is sharded over data-parallel ranks.
            optimizer: Adam settings (``train.optimizer`` or ``critic.optimizer``).
            pg_collection: from :func:`megarl.parallel.initialize`.
            backend: layer specs, ``te`` or ``torch``.
            after_load: called with ``(chunks, spec)`` after the HF weights are in, before the
                chunks are wrapped; it swaps the output layer of the last stage for another head
                (the policy's hidden-states head, the critic's value head).
            routing_replay: give the MoE routers megatron-core's ``RouterReplay``
                (``algorithm.routing_replay``; :mod:`megarl.trainer.routing`).
        """
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        overrides = _transformer_overrides(model)
        if routing_replay:
            overrides["moe_enable_routing_replay"] = True
        spec, chunks = _load_chunks(hf_path, model, layout, pg_collection=pg_collection, backend=backend, after_load=after_load, **overrides)
        if model.freeze_moe_router:
            freeze_routers(chunks)
        dtype = DTYPES[model.dtype]
        config = spec.transformer_config
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=train.use_distributed_optimizer,
        )
        models = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection) for chunk in chunks]
        megatron_optimizer = build_optimizer(models, optimizer, dtype=dtype, use_distributed_optimizer=train.use_distributed_optimizer)
        # The optimizer's fp32 main weights are copies made at construction; refresh them from the
        # loaded (and possibly modified) model weights.
        megatron_optimizer.reload_model_params()
        scheduler = build_scheduler(
            megatron_optimizer, optimizer, style=train.lr_schedule, warmup_steps=train.warmup_steps(), total_steps=train.optimizer_steps()
        )
        routers = Routers(models, chunks, spec.moe_layers, pg_collection) if any(spec.moe_layers) else None
        return cls(
            spec=spec, chunks=chunks, models=models, optimizer=megatron_optimizer, scheduler=scheduler, pg_collection=pg_collection, train=train,
            routers=routers,
        )

    @classmethod
    def build_forward_only(
        cls, hf_path: str, model: ModelConfig, layout: ParallelConfig, train: TrainConfig, *, pg_collection, backend: Backend, after_load=None
    ) -> TrainModel:
        """Build the chunks for ``layout`` and load the HF weights, for :meth:`forward` only: no DDP
        wrapper (``models`` are the chunks: no gradient buffers), no optimizer or schedule (None),
        every parameter frozen and the chunks in eval mode; :meth:`update` is not for it.

        Args are :meth:`build`'s; of ``model`` only the dtype and the MoE execution settings
        (token dispatcher, grouped GEMM) are read: recomputation, router losses, expert-bias
        updates and the capacity factor act on training (no token is dropped, as in an engine).
        """
        overrides = {"moe_token_dispatcher_type": model.moe_token_dispatcher, "moe_grouped_gemm": model.moe_grouped_gemm}
        spec, chunks = _load_chunks(hf_path, model, layout, pg_collection=pg_collection, backend=backend, after_load=after_load, **overrides)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return cls(spec=spec, chunks=chunks, models=chunks, optimizer=None, scheduler=None, pg_collection=pg_collection, train=train)

    @property
    def is_last_stage(self) -> bool:
        return self.pg_collection.pp.rank() == self.pg_collection.pp.size() - 1

    @property
    def output_weight(self) -> torch.nn.Parameter:
        """The last stage's output projection ``[V / TP, H]`` (the word embedding where the two are
        tied); only on the last pipeline stage."""
        chunk = next(chunk for chunk in self.chunks if chunk.post_process)
        return chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else chunk.output_layer.weight

    def export_hf(self, directory: Path, model: ModelConfig) -> Path:
        """Write the model as a HF model directory in ``model.dtype``, the config and tokenizer
        files from ``model.path`` (collective)."""
        from megarl.models.convert import export_hf_dir

        return export_hf_dir(
            self.chunks, self.spec, self.pg_collection, directory, resolve_model_path(model.path), dtype=DTYPES[model.dtype],
            tokenizer_dir=model.tokenizer_path,
        )

    def micro_batches(self, batch: TrainBatch, rows: torch.Tensor, fields, *, forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``rows`` (indices into ``batch``) with the token values named
        in ``fields`` (:func:`~megarl.trainer.micro_batches.rank_micro_batches`), cut as the update
        cuts them or, ``forward_only``, by the forward-only passes' size or token budget
        (:meth:`TrainConfig.forward_only`)."""
        return rank_micro_batches(
            batch, rows, fields, train=self.train.forward_only() if forward_only else self.train, pg_collection=self.pg_collection,
            transformer_config=self.spec.transformer_config, interleaved=len(self.models) > 1,
        )

    def _forward_step(self, on_output: Callable[[dict[str, torch.Tensor]], Callable]) -> Callable:
        """Megatron's ``forward_step_func`` for this model, the one every pass uses: it takes the
        next micro-batch from Megatron's data iterator, runs its tokens through the model chunk
        Megatron passes, and returns the output with ``on_output(micro)`` (the micro-batch moved to
        the device), the function Megatron calls with the output on the last pipeline stage."""

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            device = current_device()
            options = {"packed_seq_params": _packed_seq_params(micro, device)}
            if self.routers is not None:
                self.routers.before_forward(model, micro)
                options["padding_mask"] = self._padding_mask(model, micro).to(device)
            output = model(micro["tokens"].to(device), micro["position_ids"].to(device), None, **options)
            if self.routers is not None:
                self.routers.after_forward(model, micro)
            return output, on_output({name: value.to(device) for name, value in micro.items()})

        return forward_step

    def _padding_mask(self, model, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """Megatron's ``padding_mask`` for an MoE model (True: not a real token): its router losses
        (load balancing, z-loss) and the expert-bias token counts leave out padding, a pack's
        alignment and its tail. The first stage's embedding cuts it along the sequence under
        sequence parallelism; a later stage gets its TP rank's part directly."""
        padding = ~micro["token_valid"]
        chunk = self.chunks[[id(candidate) for candidate in self.models].index(id(model))]
        tp_size = self.pg_collection.tp.size()
        if not chunk.pre_process and self.spec.transformer_config.sequence_parallel and tp_size > 1:
            padding = padding.chunk(tp_size, dim=1)[self.pg_collection.tp.rank()]
        return padding.contiguous()

    def forward(
        self, batch: TrainBatch, names: tuple[str, ...], compute: Callable[[dict[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """A pass over the whole batch without gradients, in the forward-only micro-batches
        (``train.forward_micro_batch_size`` / ``train.forward_max_tokens_per_micro_batch``).

        Args:
            batch: the step's samples.
            names: the token values ``compute`` returns.
            compute: ``compute(micro, output)``: the last stage's output for a micro-batch (see
                :meth:`Objective.loss`) -> ``{name: [b, s]}`` for each of ``names``, in the
                micro-batch's grid (:func:`megarl.trainer.packing.to_grid` puts a packed
                micro-batch's results there).

        Returns:
            ``{name: [B, S]}``, float32 in label space on every rank, 0 outside the response mask.
        """

        def collect(micro, output, non_loss_data=True):
            values = compute(micro, output)
            return {"rows": micro["rows"].cpu(), "columns": micro["columns"].cpu(), **{name: values[name].float().cpu() for name in names}}

        micro_batches = self.micro_batches(batch, torch.arange(batch.size), fields=(), forward_only=True)
        outputs = self.run(micro_batches, self._forward_step(lambda micro: functools.partial(collect, micro)), forward_only=True)
        local = torch.stack([batch.empty_token_values() for _ in names])
        for output in outputs:
            rows, columns = output["rows"][:, None], output["columns"][None, :]
            for index, name in enumerate(names):
                local[index, rows, columns] = output[name]
        gathered = gather_token_values(local.to(current_device()), self.pg_collection, is_last_stage=self.is_last_stage).cpu()
        return {name: torch.where(batch.response_mask, gathered[index], 0.0) for index, name in enumerate(names)}

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
            (its named sums when training); an empty list on other stages.
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

    def update(self, batch: TrainBatch, objective: Objective, seed: int) -> dict[str, float]:
        """Train on ``batch``: ``train.ppo_epochs`` passes, each over the batch shuffled (seeded)
        and cut into mini-batches of ``train.mini_batch_size`` samples, one optimizer step each.

        Args:
            batch: the step's samples, with the token values the objective reads.
            objective: the loss and its metrics (:class:`~megarl.trainer.objective.Objective`).
            seed: the shuffling seed.

        Returns:
            ``loss`` and the objective's metrics, ``grad_norm`` and ``lr``, averaged over the
            mini-batches, and ``skipped_steps``, the optimizer steps skipped for non-finite gradients.
        """
        if self.optimizer is None:
            raise RuntimeError("this model was built by TrainModel.build_forward_only: it has no optimizer to update")
        names = (*UPDATE_SUMS, *objective.metrics)
        forward_step = self._forward_step(lambda micro: functools.partial(_micro_batch_loss, objective, micro))
        generator = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        mini_batches = 0
        for _ in range(self.train.ppo_epochs):
            order = torch.randperm(batch.size, generator=generator)
            for start in range(0, batch.size, self.train.mini_batch_size):
                rows = order[start : start + self.train.mini_batch_size]
                outputs = self.run(self.micro_batches(batch, rows, objective.fields), forward_step, forward_only=False)
                sums = self.reduce_sums(outputs, names)
                # The loss per its normaliser, every other metric per valid token.
                tokens = max(sums["tokens"], 1.0)
                metrics = {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}
                metrics.update({name: sums[name] / tokens for name in objective.metrics})
                stepped, grad_norm = self.optimizer_step()
                self.consecutive_skips = 0 if stepped else self.consecutive_skips + 1
                metrics.update({"grad_norm": grad_norm, "lr": self.learning_rate, "skipped_steps": 0.0 if stepped else 1.0})
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + value
                mini_batches += 1
        averaged = {name: value / mini_batches for name, value in totals.items()}
        averaged["skipped_steps"] = totals["skipped_steps"]
        return averaged

    def reduce_sums(self, outputs: list[dict[str, torch.Tensor]], names: tuple[str, ...]) -> dict[str, float]:
        """Add the named sums each micro-batch's loss reported over micro-batches and data- and
        context-parallel ranks, and share them with every pipeline stage (which computed none).

        Returns:
            ``{name: sum}`` for each of ``names`` (float64 sums), the same on every rank.
        """
        sums = torch.zeros(len(names), dtype=torch.float64, device=current_device())
        for output in outputs:
            sums += torch.stack([output[name] for name in names]).to(sums.device)
        if self.pg_collection.dp_cp.size() > 1:
            dist.all_reduce(sums, group=self.pg_collection.dp_cp)
        if self.pg_collection.pp.size() > 1:
            # Only the last stage computed losses; the others add zeros.
            dist.all_reduce(sums, group=self.pg_collection.pp)
        return dict(zip(names, sums.tolist()))

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


def _load_chunks(
    hf_path: str, model: ModelConfig, layout: ParallelConfig, *, pg_collection, backend: Backend, after_load, **overrides: Any
) -> tuple[ModelSpec, list]:
    """This rank's chunks of the HF model at ``hf_path`` under ``layout`` in ``model.dtype``, its
    weights loaded and ``after_load(chunks, spec)`` applied: what :meth:`TrainModel.build` and
    :meth:`TrainModel.build_forward_only` share (``overrides``: further TransformerConfig fields)."""
    spec = model_spec(load_hf_config(hf_path), layout, DTYPES[model.dtype], **overrides)
    chunks = build_model(spec, backend, pg_collection)
    load_hf_weights(chunks, spec, pg_collection, hf_path)
    if after_load is not None:
        after_load(chunks, spec)
    return spec, chunks


def _micro_batch_loss(objective: Objective, micro: dict[str, torch.Tensor], output: torch.Tensor):
    """Megatron's loss function for one micro-batch: the objective's ``(loss_sum, count)`` and, by
    name, the sums :meth:`TrainModel.reduce_sums` adds up (:data:`UPDATE_SUMS` and its metrics)."""
    loss_sum, count, metric_sums = objective.loss(micro, output)
    if metric_sums.keys() != set(objective.metrics):
        raise ValueError(
            f"{type(objective).__name__}.loss reported the metrics {sorted(metric_sums)}, "
            f"but its metrics attribute names {sorted(objective.metrics)}: make them the same"
        )
    sums = {"loss_sum": loss_sum.detach(), "count": count, "tokens": micro["response_mask"].sum(), **metric_sums}
    return loss_sum, count, {name: value.double() for name, value in sums.items()}


def _packed_seq_params(micro: dict[str, torch.Tensor], device: torch.device):
    """Megatron's ``PackedSeqParams`` for a packed micro-batch (its sample bounds, the same padded
    and unpadded: a sample's alignment padding follows it, which causal attention never reads into
    its tokens); None for a padded one."""
    if "cu_seqlens" not in micro:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = micro["cu_seqlens"].to(device=device, dtype=torch.int32)
    # A python int (Megatron's rotary embedding sizes its table by it), the longest segment: never
    # the whole pack, which Megatron's THD rotary would take for one sequence.
    longest = int(micro["max_seqlen"])
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, cu_seqlens_q_padded=bounds, cu_seqlens_kv_padded=bounds,
        max_seqlen_q=longest, max_seqlen_kv=longest,
    )
    # The portable attention's layout then reads no bounds back from the device.
    setattr(params, HOST_BOUNDS_ATTRIBUTE, micro["cu_seqlens"].tolist())
    return params


def _transformer_overrides(model: ModelConfig) -> dict[str, Any]:
    """TransformerConfig fields the ``model`` section sets."""
    overrides: dict[str, Any] = {
        "moe_token_dispatcher_type": model.moe_token_dispatcher,
        "moe_grouped_gemm": model.moe_grouped_gemm,
        # Read only by routers with an expert bias (megarl.models.deepseek_moe).
        "moe_router_bias_update_rate": model.moe_router_bias_update_rate,
    }
    if model.moe_aux_loss_coeff:
        overrides.update(moe_aux_loss_coeff=model.moe_aux_loss_coeff, moe_router_load_balancing_type=model.moe_router_load_balancing_type)
    if model.moe_z_loss_coeff is not None:
        overrides["moe_z_loss_coeff"] = model.moe_z_loss_coeff
    if model.moe_expert_capacity_factor is not None:
        overrides["moe_expert_capacity_factor"] = model.moe_expert_capacity_factor
    if model.recompute != "none":
        overrides["recompute_granularity"] = model.recompute
        if model.recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    return overrides
