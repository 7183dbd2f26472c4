"""MoE routing in the trainer: routing replay through megatron-core's ``RouterReplay``, and the
routers' health metrics.

Replay. A model built with ``moe_enable_routing_replay`` gives every router a ``RouterReplay``.
Before each micro-batch's forward on a model chunk, :class:`Routers` hands each of the chunk's
routers the experts of the tokens that router sees: the micro-batch's ``routed_experts
[b, s, L, k]`` (this context-parallel rank's columns) at the router's MoE layer, in Megatron's
token order (sequence-major, ``[s, b]`` flattened) and, under sequence parallelism, only this
tensor-parallel rank's slice of the sequence. Expert parallelism needs nothing: routers run on a
rank's own tokens before they are dispatched. Under activation recomputation the router runs again
in the backward pass; it then takes the replayed experts in the order the micro-batches were fed
(``REPLAY_BACKWARD``), the order backward passes run in.

Recording (R2). In the old-log-prob pass each router records its top-k; after every micro-batch
the records go into a ``[B, S, L, k]`` buffer at this rank's rows, columns and layers, and one
all-reduce (max; unwritten entries hold 0 and written ones expert + 1) over every rank assembles
the whole batch's routing, which the update then replays.

Metrics (:meth:`Routers.measuring`). Over the real tokens of a forward pass (no padding): the
tokens each expert of each layer receives, summarised as max / mean per layer
(``moe/expert_load_max_mean``, averaged over layers, and ``moe/expert_load_max_mean_worst``),
the entropy of the router's distribution over experts (softmax, or sigmoid scores normalised to
sum 1), the fraction of token-expert assignments dropped by the capacity factor, and, when the
batch carries the engines' routing, the fraction of (token, layer) pairs routed differently from
the engine (only the tokens the engine routed): as the pass routed them (``moe/routing_diff``: 0
under replay, but for the tokens a capacity factor dropped) and as the trainer routes them on its
own, in the router's dtype (``moe/routing_diff_recomputed``: what replay removes).

Tokens without recorded routing (each sample's last token, which the engine never ran, and
padding) replay :func:`megarl.trainer.batch.routing_filler`'s experts, spread over all experts; a
packed micro-batch's tail replays its first row's (:mod:`megarl.trainer.packing`). Megatron's router
losses and expert-bias counts leave all of them out (``padding_mask``, :class:`TrainModel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from megarl.platform import current_device
from megarl.trainer.batch import routed_experts_dtype, routing_filler


def _action(name: str):
    """megatron-core's ``RouterReplayAction`` member (imported when a pass first needs it: megarl
    imports Megatron once its import-time settings are in place)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    return RouterReplayAction[name]


_IN_BACKWARD = -1
"""``torch._C._current_graph_task_id()`` outside a backward pass."""


@dataclasses.dataclass
class _Measures:
    """Sums over this rank's real tokens, per MoE layer ``[L]`` (the load ``[L, E]``), on the device."""

    load: torch.Tensor
    tokens: torch.Tensor
    negative_entropy: torch.Tensor
    compared: torch.Tensor
    """Tokens whose engine routing the batch carries."""
    routing_diff: torch.Tensor
    routing_diff_recomputed: torch.Tensor

    @classmethod
    def zeros(cls, layers: int, experts: int) -> _Measures:
        device = current_device()
        return cls(**{
            field.name: torch.zeros((layers, experts) if field.name == "load" else (layers,), dtype=torch.float64, device=device)
            for field in dataclasses.fields(cls)
        })

    def summed_over_ranks(self) -> _Measures:
        """Every rank's sums added up, on the host (a collective over every rank)."""
        fields = dataclasses.fields(self)
        flat = torch.cat([getattr(self, field.name).reshape(-1) for field in fields])
        if dist.get_world_size() > 1:
            dist.all_reduce(flat)
        parts = flat.cpu().split([getattr(self, field.name).numel() for field in fields])
        return _Measures(**{field.name: part.reshape(getattr(self, field.name).shape) for field, part in zip(fields, parts)})


class Routers:
    """The MoE routers of one model's chunks on this rank.

    Args:
        models: the chunks as Megatron's schedule passes them to the forward step (DDP-wrapped).
        chunks: the same chunks, unwrapped.
        moe_layers: for every global layer, whether it is an MoE layer.
        pg_collection: the process groups.
    """

    def __init__(self, models: list, chunks: list, moe_layers: list[bool], pg_collection):
        self.moe_layers = [layer for layer, is_moe in enumerate(moe_layers) if is_moe]
        """Global indices of the model's MoE layers; the ``L`` axis of ``routed_experts``."""
        index_of = {layer: index for index, layer in enumerate(self.moe_layers)}
        self._chunk_of = {id(model): position for position, model in enumerate(models)}
        self._routers: list[list[tuple[int, torch.nn.Module]]] = []
        self._index_of: dict[int, int] = {}
        """``id(router)`` -> its MoE layer's index."""
        for chunk in chunks:
            routers = [
                (index_of[layer.layer_number - 1], layer.mlp.router)
                for layer in chunk.decoder.layers
                if getattr(layer.mlp, "router", None) is not None
            ]
            self._routers.append(routers)
            for index, router in routers:
                self._index_of[id(router)] = index
                self._install(router)
        config = chunks[0].config
        self._config = config
        self._pg_collection = pg_collection
        self.micro_batches = 0
        """Micro-batches fed since :meth:`tracking_losses` began."""
        self.num_experts = config.num_moe_experts or 0
        self.topk = config.moe_router_topk
        self.tp_rank, self.tp_size = pg_collection.tp.rank(), pg_collection.tp.size()
        self.sequence_parallel = config.sequence_parallel
        self.replaying = False
        self.recorded: torch.Tensor | None = None
        self.measures: _Measures | None = None
        self._engine: torch.Tensor | None = None
        """``[s_local * b, L, k]`` the engine's experts of the micro-batch's tokens, when it has them."""
        self._valid: torch.Tensor | None = None
        """``[s_local * b]`` which of the micro-batch's tokens are real (not padding)."""
        self._valid_count: torch.Tensor | None = None
        self._covered: torch.Tensor | None = None
        """``[s_local * b]`` which of them the engine routed (``token_routed``)."""

    @property
    def can_replay(self) -> bool:
        """Whether the routers were built with ``moe_enable_routing_replay``."""
        return all(router.router_replay is not None for routers in self._routers for _, router in routers)

    # Passes.

    @contextlib.contextmanager
    def replaying_routing(self) -> Iterator[None]:
        """Within the block every forward replays the micro-batches' ``routed_experts``."""
        self._check_replay()
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False
            self._clear()

    @contextlib.contextmanager
    def recording(self, batch_shape: tuple[int, int]) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block every forward records its routing; after it ``result["routed_experts"]``
        holds the whole batch's ``[B, S, L, k]`` (a collective over every rank when the block ends)."""
        self._check_replay()
        # Expert + 1, so that 0 says "not written" and a max over the ranks assembles the batch
        # (gloo and NCCL reduce no int16: int32 past 255 experts).
        dtype = torch.uint8 if self.num_experts < 256 else torch.int32
        self.recorded = torch.zeros(*batch_shape, len(self.moe_layers), self.topk, dtype=dtype)
        for _, router in self._all_routers():
            router.router_replay.set_router_replay_action(_action("RECORD"))
        result: dict[str, torch.Tensor] = {}
        try:
            yield result
        finally:
            recorded, self.recorded = self.recorded, None
            self._clear()
        recorded = recorded.to(current_device())
        if dist.get_world_size() > 1:
            dist.all_reduce(recorded, op=dist.ReduceOp.MAX)
        result["routed_experts"] = recorded_experts(recorded.cpu(), self.topk, self.num_experts)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[dict[str, float]]:
        """Within the block every forward adds to the router metrics; after it (a collective over
        every rank) the dict holds them (module docstring)."""
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        self._topk_routing = topk_routing_with_score_function
        self.measures = _Measures.zeros(len(self.moe_layers), self.num_experts)
        metrics: dict[str, float] = {}
        try:
            yield metrics
        finally:
            measures, self.measures = self.measures, None
        metrics.update(_summarise(measures, self.topk))

    @contextlib.contextmanager
    def tracking_losses(self) -> Iterator[dict[str, float]]:
        """Within the block Megatron's router losses add up (they exist in training passes only);
        after it (a collective) the dict holds each enabled one's mean over micro-batches and MoE
        layers: ``moe/load_balancing_loss`` (or ``seq_``/``global_``), ``moe/z_loss``."""
        from megatron.core.transformer.moe import moe_utils

        names = _router_loss_names(self._config)
        moe_utils.clear_aux_losses_tracker()
        self.micro_batches = 0
        losses: dict[str, float] = {}
        yield losses
        if not names:
            return
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        for name in names:
            # A stage whose layers are all dense records nothing but still takes part in the reductions.
            if name not in tracker:
                tracker[name] = {"values": torch.zeros(self._config.num_layers, device=current_device()), "reduce_group": None, "avg_group": None}
        moe_utils.reduce_aux_losses_tracker_across_ranks(names, pg_collection=self._pg_collection)
        for name in names:
            losses[f"moe/{name}"] = float(tracker[name]["values"].sum()) / (max(self.micro_batches, 1) * len(self.moe_layers))
        moe_utils.clear_aux_losses_tracker()

    def _check_replay(self) -> None:
        if not self.can_replay:
            raise RuntimeError("routing replay needs the model built with moe_enable_routing_replay (TrainModel.build(routing_replay=True))")

    def _all_routers(self) -> Iterator[tuple[int, torch.nn.Module]]:
        for routers in self._routers:
            yield from routers

    def _clear(self) -> None:
        for _, router in self._all_routers():
            if router.router_replay is not None:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()

    # Micro-batches.

    def before_forward(self, model, micro: dict[str, torch.Tensor]) -> None:
        """Called with each micro-batch before ``model`` (one chunk) runs it."""
        chunk = self._chunk_of[id(model)]
        if chunk == 0:
            self.micro_batches += 1
        routers = self._routers[chunk]
        if not routers or not (self.replaying or self.recorded is not None or self.measures is not None):
            return
        device = current_device()
        self._valid = self._local(micro["token_valid"]).to(device)
        self._valid_count = self._valid.sum()
        engine = micro.get("routed_experts")
        self._engine = None if engine is None else self._local(engine.to(torch.int64)).to(device)
        if engine is not None:
            # The engine's own experts, not the filler of the tokens it did not route.
            self._covered = self._local(micro["token_routed"]).to(device)
        if self.replaying:
            if engine is None:
                raise ValueError("routing replay was asked for a batch without routed_experts")
            for index, router in routers:
                router.router_replay.set_target_indices(self._engine[:, index, :])
                router.router_replay.set_router_replay_action(_action("REPLAY_FORWARD"))

    def after_forward(self, model, micro: dict[str, torch.Tensor]) -> None:
        """Called with each micro-batch after ``model`` ran it: stores what the routers recorded;
        drops the replayed experts no backward recomputation will read again."""
        if self.replaying and not (torch.is_grad_enabled() and self._config.recompute_granularity == "full"):
            for _, router in self._routers[self._chunk_of[id(model)]]:
                router.router_replay.replay_backward_list.clear()
        if self.recorded is None:
            return
        # Each token's place in the batch, in the routers' order; a pack's tail has none.
        rows, columns = self._local(micro["token_rows"]), self._local(micro["token_columns"])
        placed = (rows >= 0).nonzero().squeeze(1)
        rows, columns = rows[placed], columns[placed]
        for index, router in self._routers[self._chunk_of[id(model)]]:
            topk = router.router_replay.get_recorded_indices().cpu()
            self.recorded[rows, columns, index] = (topk[placed] + 1).to(self.recorded.dtype)

    def _sequence_slice(self, values: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's part of a ``[s, ...]`` sequence under sequence parallelism."""
        if self.sequence_parallel and self.tp_size > 1:
            return values.chunk(self.tp_size, dim=0)[self.tp_rank]
        return values

    def _local(self, values: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]`` -> the ``[s_local * b, ...]`` tokens this rank's routers see, in their order."""
        tokens = self._sequence_slice(values.transpose(0, 1))
        return tokens.reshape(-1, *values.shape[2:])

    # Router hooks.

    def _install(self, router: torch.nn.Module) -> None:
        # Megatron's router has no hook point between its gating and its routing, and the metrics
        # need the logits: this router's gating is wrapped to keep them while measuring.
        gating = router.gating

        def gating_keeping_logits(hidden: torch.Tensor) -> torch.Tensor:
            logits = gating(hidden)
            if self.measures is not None:
                router.megarl_logits = logits.detach()
            return logits

        router.gating = gating_keeping_logits
        router.register_forward_pre_hook(self._choose_action)
        router.register_forward_hook(self._measure)

    def _choose_action(self, router, args) -> None:
        if self.replaying and router.router_replay is not None:
            in_backward = torch._C._current_graph_task_id() != _IN_BACKWARD
            router.router_replay.set_router_replay_action(_action("REPLAY_BACKWARD") if in_backward else _action("REPLAY_FORWARD"))

    def _measure(self, router, args, output) -> None:
        # Masks rather than boolean indexing, and sums kept on the device: no host synchronisation
        # per router call.
        if self.measures is None or torch._C._current_graph_task_id() != _IN_BACKWARD:
            return
        # The logits in the dtype the router routes in (moe_router_dtype), for the recomputed top-k.
        routing_logits = router.__dict__.pop("megarl_logits").reshape(-1, self.num_experts)
        logits = routing_logits.float()
        routing_map = output[1].reshape(-1, self.num_experts)
        index = self._index_of[id(router)]
        valid = self._valid
        measures = self.measures
        measures.load[index] += (routing_map & valid[:, None]).sum(dim=0)
        measures.tokens[index] += self._valid_count
        if router.score_function == "sigmoid":
            # The sigmoid scores normalised to sum 1: log p = log sigmoid - log sum sigmoid.
            log_scores = torch.nn.functional.logsigmoid(logits)
            log_distribution = log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)
        else:
            log_distribution = torch.log_softmax(logits, dim=-1)
        measures.negative_entropy[index] += (log_distribution.exp() * log_distribution * valid[:, None]).sum()
        if self._engine is None:
            return
        covered = self._covered
        engine = torch.zeros_like(routing_map).scatter_(1, self._engine[:, index, :], True)
        measures.compared[index] += covered.sum()
        measures.routing_diff[index] += ((routing_map != engine).any(dim=-1) & covered).sum()
        config = router.config
        _, own = self._topk_routing(
            routing_logits, self.topk, use_pre_softmax=config.moe_router_pre_softmax, num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk, scaling_factor=config.moe_router_topk_scaling_factor,
            score_function=router.score_function, expert_bias=router.expert_bias,
        )
        measures.routing_diff_recomputed[index] += ((own != engine).any(dim=-1) & covered).sum()


def freeze_routers(chunks: list) -> list[str]:
    """Take the routing out of training (``model.freeze_moe_router``): every MoE router's gating
    weight (and bias, where it has one) and every shared expert's gate (Qwen2-MoE's
    ``shared_expert_gate``) stop requiring gradients. Called before the chunks are wrapped in
    Megatron's DDP, they then get no gradient buffer and no place in the optimizer, so an update
    leaves them as they are; a router's expert bias is a buffer that only
    ``model.moe_router_bias_update_rate`` moves (0 with a frozen router: :mod:`megarl.config.checks`).
    A dense model has nothing to freeze.

    Returns:
        The names of the frozen parameters (``chunk index.parameter name``), in model order.
    """
    from megatron.core.transformer.moe.router import Router
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    frozen = []
    for position, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if isinstance(module, Router):
                parameters = list(module.named_parameters(recurse=False))
            elif isinstance(module, SharedExpertMLP) and module.gate_weight is not None:
                parameters = [("gate_weight", module.gate_weight)]
            else:
                continue
            for parameter_name, parameter in parameters:
                parameter.requires_grad_(False)
                frozen.append(f"{position}.{name}.{parameter_name}")
    return frozen


def recorded_experts(recorded: torch.Tensor, topk: int, num_experts: int) -> torch.Tensor:
    """``TrainBatch.routed_experts`` from R2's assembled record: expert + 1 where a rank wrote it,
    0 where none did (padding past every micro-batch's length), which gets
    :func:`~megarl.trainer.batch.routing_filler`'s experts."""
    unwritten = recorded == 0
    # In uint8 the unwritten entries wrap round; they are replaced below.
    experts = (recorded - 1).to(routed_experts_dtype(num_experts))
    filler = routing_filler(recorded.shape[1], topk, num_experts)[None, :, None, :].expand_as(experts)
    return torch.where(unwritten, filler, experts)


def _router_loss_names(config) -> list[str]:
    """The names under which Megatron's routers record the losses ``config`` enables."""
    balancing = config.moe_router_load_balancing_type
    types, coefficients = ([balancing], [config.moe_aux_loss_coeff]) if isinstance(balancing, str) else (balancing, config.moe_aux_loss_coeff)
    names = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss", "global_aux_loss": "global_load_balancing_loss"}
    enabled = [names[kind] for kind, coefficient in zip(types, coefficients) if kind in names and coefficient]
    if config.moe_z_loss_coeff:
        enabled.append("z_loss")
    return enabled


def _summarise(measures: _Measures, topk: int) -> dict[str, float]:
    """The metrics of :class:`Routers` from every rank's sums (a collective over every rank)."""
    total = measures.summed_over_ranks()
    tokens = total.tokens
    if not bool((tokens > 0).all()):
        return {}
    balance = total.load.max(dim=1).values / total.load.mean(dim=1).clamp_min(1e-12)
    metrics = {
        "moe/expert_load_max_mean": float(balance.mean()),
        "moe/expert_load_max_mean_worst": float(balance.max()),
        "moe/router_entropy": float((-total.negative_entropy / tokens).mean()),
        # Every real token has k places; those the capacity factor dropped are missing from the load.
        "moe/tokens_dropped": float(1 - total.load.sum() / (tokens.sum() * topk)),
    }
    if bool((total.compared > 0).all()):
        metrics["moe/routing_diff"] = float(total.routing_diff.sum() / total.compared.sum())
        metrics["moe/routing_diff_recomputed"] = float(total.routing_diff_recomputed.sum() / total.compared.sum())
    return metrics
