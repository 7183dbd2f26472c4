"""Which rank holds which shard of which parameter: the whole model's layout, agreed by all ranks.

Every rank lists its local parameters (global name, mapping rule, tensor-parallel shard, shape,
dtype); one ``all_gather_object`` gives every rank the same list, in the exporter's order
(:mod:`megarl.models.exporter`): the family's rule order, experts by id.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from megarl.models.families import family_of
from megarl.models.loader import local_parameters, tensor_parallel_coordinates
from megarl.weights.planner import ParameterLayout, ShardKey, unique_hf_tensors


@dataclasses.dataclass(frozen=True, slots=True)
class ModelLayout:
    """The whole model's parameters and where their shards live."""

    parameters: list[ParameterLayout]
    """Every parameter once, in stream order, each HF tensor produced once."""
    holders: dict[ShardKey, tuple[int, ...]]
    """For every shard, the global ranks holding a copy (tensor-parallel peers of replicated
    parameters and data-parallel replicas all hold one)."""
    local: dict[ShardKey, int]
    """The shards this rank holds, each mapped to its index in :attr:`local_parameters`."""
    local_parameters: list[torch.nn.Parameter]
    """This rank's parameters that the stream reads."""


@dataclasses.dataclass(frozen=True, slots=True)
class _LocalShard:
    order: tuple[int, int]
    layout: ParameterLayout
    shard: int


def gather_model_layout(chunks, spec, pg_collection) -> ModelLayout:
    """The model's layout as every rank sees it. Collective: every rank must call it.

    Args:
        chunks: this rank's model chunks (:func:`megarl.models.builder.build_model`).
        spec: their :class:`~megarl.models.builder.ModelSpec`.
        pg_collection: the process groups.

    Raises:
        ValueError: ranks disagree on a parameter's shape or dtype, or no rank holds some shard.
    """
    rules = family_of(spec.hf_config).weight_rules(spec.hf_config)
    rule_index = {rule.megatron: index for index, rule in enumerate(rules)}
    mine, params = [], []
    for location, _, param, rule in local_parameters(chunks, spec, pg_collection):
        rank, size = tensor_parallel_coordinates(rule, pg_collection)
        layout = ParameterLayout(
            rule=rule,
            shard_shape=tuple(param.shape),
            dtype=param.dtype,
            num_shards=size if rule.parallel else 1,
        )
        order = (rule_index[location.key], location.expert if location.expert is not None else -1)
        mine.append(_LocalShard(order=order, layout=layout, shard=rank if rule.parallel else 0))
        params.append(param)
    gathered: list[list[_LocalShard]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)

    by_key: dict[str, tuple[tuple[int, int], ParameterLayout]] = {}
    holders_by_name: dict[tuple[str, int], list[int]] = {}
    for rank, shards in enumerate(gathered):
        for entry in shards:
            key = entry.layout.rule.megatron
            known = by_key.setdefault(key, (entry.order, entry.layout))[1]
            if known != entry.layout:
                raise ValueError(
                    f"ranks disagree on {key}: {known.shard_shape} {known.dtype} x {known.num_shards} "
                    f"shards vs {entry.layout.shard_shape} {entry.layout.dtype} x "
                    f"{entry.layout.num_shards} on rank {rank}; every replica must hold the same model"
                )
            holders_by_name.setdefault((key, entry.shard), []).append(rank)
    ordered = [layout for _, layout in sorted(by_key.values(), key=lambda item: item[0])]
    parameters = unique_hf_tensors(ordered)
    index_of = {layout.rule.megatron: index for index, layout in enumerate(parameters)}

    holders: dict[ShardKey, tuple[int, ...]] = {}
    for index, layout in enumerate(parameters):
        for shard in range(layout.num_shards):
            ranks = holders_by_name.get((layout.rule.megatron, shard))
            if not ranks:
                raise ValueError(f"no rank holds shard {shard} of {layout.rule.megatron}")
            holders[(index, shard)] = tuple(sorted(ranks))
    local = {
        (index_of[entry.layout.rule.megatron], entry.shard): position
        for position, entry in enumerate(mine)
        if entry.layout.rule.megatron in index_of
    }
    return ModelLayout(parameters=parameters, holders=holders, local=local, local_parameters=params)


def choose_senders(holders: dict[ShardKey, tuple[int, ...]], dst: int, nearby: Sequence[int] = ()) -> dict[ShardKey, int]:
    """The rank that provides each shard: the destination itself when it holds one (no transfer),
    else the lowest rank of ``nearby`` (the destination's node: no bytes between nodes) holding
    it, else the lowest rank holding it."""
    near = set(nearby)

    def sender(ranks: tuple[int, ...]) -> int:
        if dst in ranks:
            return dst
        return next((rank for rank in ranks if rank in near), ranks[0])

    return {key: sender(ranks) for key, ranks in holders.items()}
