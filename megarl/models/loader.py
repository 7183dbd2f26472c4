"""Load HuggingFace safetensors into Megatron model chunks under any TP/PP/VPP/EP/ETP layout.

Each rank reads only the slices its parameters own (safetensors' lazy ``get_slice``), never the
whole model: the mapping rules (:mod:`megarl.models.mapping`) say which HF slices form each shard.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import transformers
from safetensors import safe_open
from tqdm import tqdm

from megarl.models.families import family_of
from megarl.models.mapping import Rule

_IGNORED_HF_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")
"""Buffers some HF checkpoints hold that are not weights; transformers ignores them too."""

# Transformer Engine's spec fuses the pre-attention and pre-MLP norms into the following linear
# layer; its grouped experts name each expert's weight ``weight{j}``. Mapping rules use the
# portable spec's names; these translate TE's.
_TE_NAMES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    # Multi-latent attention: the q and kv latents' norms, fused into their up projections.
    (re.compile(r"self_attention\.linear_q_up_proj\.layer_norm_weight$"), "self_attention.q_layernorm.weight"),
    (re.compile(r"self_attention\.linear_kv_up_proj\.layer_norm_weight$"), "self_attention.kv_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"), r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
)
_WEIGHT_BUFFERS = re.compile(r"\.router\.expert_bias$")
"""Buffers that are weights of the model: a sigmoid router's expert bias (HF's
``e_score_correction_bias``) is no parameter (no gradient trains it) but part of the checkpoint,
and the engines route with it."""
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


class CheckpointError(ValueError):
    """A HF checkpoint does not match the model: names the file and the tensor."""


def load_hf_config(path: str | Path):
    """Read a HuggingFace ``config.json`` (no weights) from a local directory.

    Raises:
        CheckpointError: the directory has no config.json, or transformers cannot read it.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist: expected a HuggingFace model directory (config.json, safetensors)")
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise CheckpointError(f"{config_file}: transformers cannot read it ({error})") from None


def canonical_name(name: str) -> str:
    """A Megatron parameter name in the portable spec's naming (TE's fused names translated)."""
    for pattern, replacement in _TE_NAMES:
        name = pattern.sub(replacement, name)
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class ParamLocation:
    """Where a local Megatron parameter sits in the whole model."""

    key: str
    """Global Megatron name: global layer index, local expert index replaced by ``{expert}``."""
    layer: int | None
    """Global layer index (None outside the decoder layers)."""
    expert: int | None
    """Global expert id (None for non-expert weights)."""


def locate(local_name: str, chunk, ep_rank: int, num_local_experts: int) -> ParamLocation:
    """Map a parameter name of a model chunk to its global layer and expert.

    Args:
        local_name: the name in ``chunk.named_parameters()`` (or of a buffer, :func:`model_weights`).
        chunk: the GPTModel chunk holding it (its layers know their global numbers).
        ep_rank: this rank in the expert-parallel group.
        num_local_experts: experts per EP rank.
    """
    name = canonical_name(local_name)
    layer = None
    layer_match = _LAYER.match(name)
    if layer_match:
        layer = chunk.decoder.layers[int(layer_match.group(1))].layer_number - 1
        name = f"decoder.layers.{layer}." + name[layer_match.end() :]
    expert = None
    expert_match = _LOCAL_EXPERT.search(name)
    if expert_match:
        expert = ep_rank * num_local_experts + int(expert_match.group(1))
        name = name[: expert_match.start()] + ".local_experts.{expert}." + name[expert_match.end() :]
    return ParamLocation(key=name, layer=layer, expert=expert)


def model_weights(chunk) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a model chunk's parameters, then of its buffers that are weights
    (:data:`_WEIGHT_BUFFERS`): what the loader fills, the exporter writes and the weight stream
    sends."""
    yield from chunk.named_parameters()
    for name, buffer in chunk.named_buffers():
        if _WEIGHT_BUFFERS.search(name):
            yield name, buffer


def expected_hf_names(hf_config) -> set[str]:
    """Every HF tensor the family's mapping rules read, for all layers and experts."""
    family = family_of(hf_config)
    experts = family.config_fields(hf_config).get("num_moe_experts") or 0
    names: set[str] = set()
    for rule in family.weight_rules(hf_config):
        for expert in range(experts) if rule.is_expert else (None,):
            names.update(rule.instantiate(expert=expert).hf)
    return names


class HFCheckpoint:
    """Lazy, slice-level reader of a HF safetensors checkpoint (single file or sharded + index).

    Opening reads every file's header, so that a truncated or damaged file is named before any
    model is built.

    Raises:
        CheckpointError: no checkpoint in the directory, an index that is not JSON, or a file
            that is not a complete safetensors file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        self._handles: dict[Path, object] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: not a safetensors index (JSON with a weight_map): {error}") from None
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._open(single).keys()}
        else:
            raise CheckpointError(
                f"{self.directory}: no model.safetensors or model.safetensors.index.json; "
                f"expected a HuggingFace checkpoint directory"
            )
        for path in sorted(set(self.files.values())):
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {index.name} but does not exist")
            self._open(path)

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except Exception as error:  # safetensors raises its own SafetensorError (not exported) and OSError
                raise CheckpointError(
                    f"{path}: not a complete safetensors file ({error}); copy or download it again"
                ) from None
        return self._handles[path]

    def check_names(self, hf_config) -> None:
        """Every tensor of the checkpoint is one the model reads, and every one it reads is here.

        With tied embeddings transformers ignores a stored ``lm_head.weight``; so does megarl, and
        it accepts the tensors the family loads past (``ignored_hf_tensors``: multi-token-prediction
        layers).

        Raises:
            CheckpointError: naming the tensors the model would drop or lacks.
        """
        expected = expected_hf_names(hf_config)
        ignored = family_of(hf_config).ignored_hf_tensors(hf_config)
        stored = {name for name in self.files if not _IGNORED_HF_TENSORS.search(name) and not name.startswith(ignored)}
        if getattr(hf_config, "tie_word_embeddings", False):
            stored.discard("lm_head.weight")
        unused, missing = sorted(stored - expected), sorted(expected - stored)
        problems = []
        if unused:
            problems.append(
                f"{len(unused)} tensor(s) the {family_of(hf_config).name} model would not use ({_some(unused)}): "
                f"megarl refuses to drop weights; does config.json describe this checkpoint?"
            )
        if missing:
            problems.append(f"{len(missing)} tensor(s) the model needs are missing ({_some(missing)})")
        if problems:
            raise CheckpointError(f"{self.directory}: " + "; ".join(problems))

    def _handle(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing from the checkpoint")
        return self._open(self.files[name])

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of tensor ``name`` along ``dim``, read from disk alone."""
        tensor_slice = self._handle(name).get_slice(name)
        shape = tensor_slice.get_shape()
        if stop > shape[dim]:
            raise CheckpointError(
                f"{self.files[name]}: tensor {name} has shape {shape}; the model needs entries "
                f"{start}:{stop} of dim {dim}. Does the checkpoint match the config?"
            )
        index = (slice(None),) * dim + (slice(start, stop),)
        return tensor_slice[index]


def _some(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def shard_from_hf(checkpoint: HFCheckpoint, rule: Rule, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Assemble one rank's shard of ``param`` from the HF slices ``rule`` names."""
    pieces = []
    for segment in rule.segments(param.shape[rule.dim], rank, size):
        if segment.hf_name is None:
            shape = list(param.shape)
            shape[rule.dim] = segment.length
            pieces.append(torch.zeros(shape, dtype=param.dtype))
        else:
            pieces.append(checkpoint.read(segment.hf_name, rule.dim, segment.start, segment.stop).to(param.dtype))
    shard = torch.cat(pieces, dim=rule.dim)
    if shard.shape != param.shape:
        names = ", ".join(n for n in rule.hf)
        raise CheckpointError(
            f"{checkpoint.directory}: {names} give a {tuple(shard.shape)} shard for {rule.megatron}, "
            f"which has shape {tuple(param.shape)}. Does the checkpoint match the config?"
        )
    return shard


def local_parameters(chunks, spec, pg_collection) -> Iterator[tuple[ParamLocation, str, torch.Tensor, Rule]]:
    """Every weight of this rank's chunks (:func:`model_weights`: the parameters and the routers'
    expert bias) with its global location and its (filled-in) rule."""
    rules = {rule.megatron: rule for rule in family_of(spec.hf_config).weight_rules(spec.hf_config)}
    experts = spec.transformer_config.num_moe_experts or 0
    num_local_experts = experts // pg_collection.ep.size() if experts else 0
    for chunk in chunks:
        for name, param in model_weights(chunk):
            location = locate(name, chunk, pg_collection.ep.rank(), num_local_experts)
            if location.key not in rules:
                raise KeyError(
                    f"no mapping rule for Megatron parameter {name} ({location.key}) of "
                    f"{family_of(spec.hf_config).name}; add it to the family's weight rules"
                )
            yield location, name, param, rules[location.key].instantiate(expert=location.expert)


def tensor_parallel_coordinates(rule: Rule, pg_collection) -> tuple[int, int]:
    """(rank, size) of the group that splits ``rule``'s parameter: ETP for experts, else TP."""
    group = pg_collection.expt_tp if rule.is_expert else pg_collection.tp
    return group.rank(), group.size()


def load_hf_weights(chunks, spec, pg_collection, directory: str | Path) -> None:
    """Copy a HF checkpoint's weights into this rank's Megatron chunks.

    Every tensor of the checkpoint must be one the model reads (:meth:`HFCheckpoint.check_names`).

    Args:
        chunks: the model chunks from :func:`megarl.models.builder.build_model`.
        spec: their :class:`~megarl.models.builder.ModelSpec`.
        pg_collection: the process groups.
        directory: HF checkpoint directory (safetensors).
    """
    checkpoint = HFCheckpoint(directory)
    checkpoint.check_names(spec.hf_config)
    parameters = list(local_parameters(chunks, spec, pg_collection))
    # One bar, on the first rank; every rank loads its own slices.
    progress = tqdm(parameters, desc="load HF weights", unit="tensor", disable=dist.get_rank() != 0)
    with torch.no_grad():
        for _, _, param, rule in progress:
            rank, size = tensor_parallel_coordinates(rule, pg_collection)
            param.copy_(shard_from_hf(checkpoint, rule, param, rank, size))
