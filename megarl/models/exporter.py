"""Export Megatron model chunks as full HuggingFace tensors, gathered over TP, ETP, PP and EP.

All ranks build the same manifest (every parameter, which rank sends it, the HF tensors it holds)
and walk it in the same order. For each parameter the tensor-parallel group of one replica gathers
its shards, its first rank assembles the HF tensors with the mapping rules, and sends them to the
destination rank, which yields them. One parameter is in flight at a time, so memory stays at one
layer's weights whatever the model size.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist

from megarl.models.families import family_of
from megarl.models.loader import local_parameters, tensor_parallel_coordinates
from megarl.models.mapping import Rule
from megarl.platform import current_device


@dataclasses.dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One Megatron parameter in export order."""

    key: str
    """Global Megatron name with the expert id filled in."""
    sender: int
    """Global rank that assembles and sends its HF tensors."""
    hf_tensors: tuple[tuple[str, tuple[int, ...]], ...]
    """(HF name, full shape) of each HF tensor it holds, in rule order."""
    dtype: torch.dtype
    order: tuple[int, int]
    """(rule index, expert id): the global export order."""


def _hf_shapes(rule: Rule, local_shape: torch.Size, size: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    lengths = rule.hf_lengths(local_shape[rule.dim], size)
    shapes = []
    for name in rule.hf:
        shape = list(local_shape)
        shape[rule.dim] = lengths[name]
        shapes.append((name, tuple(shape)))
    return tuple(shapes)


def _is_exporting_replica(rule: Rule, pg_collection) -> bool:
    """Data- and context-parallel replicas hold identical weights: the first one exports."""
    replica_group = pg_collection.expt_dp if rule.is_expert else pg_collection.dp_cp
    return replica_group.rank() == 0


def assemble_hf(rule: Rule, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full HF tensors from every tensor-parallel rank's shard of one parameter."""
    size = len(shards)
    local_length = shards[0].shape[rule.dim]
    shapes = dict(_hf_shapes(rule, shards[0].shape, size))
    tensors = {name: torch.empty(shape, dtype=shards[0].dtype) for name, shape in shapes.items()}
    for rank, shard in enumerate(shards):
        offset = 0
        for segment in rule.segments(local_length, rank, size):
            piece = shard.narrow(rule.dim, offset, segment.length)
            offset += segment.length
            if segment.hf_name is not None:
                tensors[segment.hf_name].narrow(rule.dim, segment.start, segment.length).copy_(piece)
    return tensors


def build_manifest(chunks, spec, pg_collection) -> list[ManifestEntry]:
    """Every parameter of the whole model, with its sender, in the same order on all ranks."""
    rules = family_of(spec.hf_config).weight_rules(spec.hf_config)
    rule_index = {rule.megatron: index for index, rule in enumerate(rules)}
    local = []
    for location, _, param, rule in local_parameters(chunks, spec, pg_collection):
        rank, size = tensor_parallel_coordinates(rule, pg_collection)
        if rank != 0 or not _is_exporting_replica(rule, pg_collection):
            continue
        local.append(
            ManifestEntry(
                key=rule.megatron,
                sender=dist.get_rank(),
                hf_tensors=_hf_shapes(rule, param.shape, size),
                dtype=param.dtype,
                order=(rule_index[location.key], location.expert if location.expert is not None else -1),
            )
        )
    gathered: list[list[ManifestEntry]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    manifest, produced = [], set()
    for entry in sorted((e for rank_entries in gathered for e in rank_entries), key=lambda e: e.order):
        names = {name for name, _ in entry.hf_tensors}
        # Tied embeddings: the output layer copy maps to the embedding's HF tensor; export it once.
        if names <= produced:
            continue
        produced |= names
        manifest.append(entry)
    return manifest


def export_hf_tensors(chunks, spec, pg_collection, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model on rank ``dst``.

    Every rank must consume the iterator to the end (it drives the collectives); ranks other than
    ``dst`` yield nothing. Tensors come in the model's order (embedding, layers, head) with the
    vocabulary padding removed.
    """
    manifest = build_manifest(chunks, spec, pg_collection)
    mine = {}
    for _, _, param, rule in local_parameters(chunks, spec, pg_collection):
        if _is_exporting_replica(rule, pg_collection):
            mine[rule.megatron] = (param, rule)
    me = dist.get_rank()
    for entry in manifest:
        if entry.key in mine:
            param, rule = mine[entry.key]
            group = pg_collection.expt_tp if rule.is_expert else pg_collection.tp
            shard = param.detach().contiguous()
            shards = [torch.empty_like(shard) for _ in range(group.size())]
            dist.all_gather(shards, shard, group=group)
            if me == entry.sender:
                tensors = assemble_hf(rule, [s.cpu() for s in shards])
                for name, _ in entry.hf_tensors:
                    if me == dst:
                        yield name, tensors[name]
                    else:
                        dist.send(tensors[name].to(shard.device), dst)
        elif me == dst:
            for name, shape in entry.hf_tensors:
                buffer = torch.empty(shape, dtype=entry.dtype, device=current_device())
                dist.recv(buffer, entry.sender)
                yield name, buffer.cpu()

