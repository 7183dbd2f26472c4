"""The model and the training layout: ``model`` and ``parallel``, the facts of a HF model that the
layout must fit, and the layout rules (stated once, for the config, the conversion tools and
:func:`megarl.parallel.initialize`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from megarl.config.base import ConfigError, Range, Section, _divisors, _one_of


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``model.dtype`` -> the torch dtype's name (``torch.float32`` ...; engines take the name)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig(Section):
    """The policy model: where it comes from and how Megatron builds its layers."""

    path: str = "bundled:tiny-moe"
    """HuggingFace model directory the policy starts from (config.json + safetensors);
    ``bundled:NAME`` is a tiny model shipped in megarl/assets/models (verl:
    actor_rollout_ref.model.path, slime: --hf-checkpoint)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; null: the model directory (verl: data.tokenizer)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and compute dtype. fp32 keeps CPU runs exact; bf16 is the GPU choice
    (slime: --bf16 / --fp16)."""
    attention_backend: Literal["auto", "torch", "te"] = "auto"
    """Layer implementation: Transformer Engine specs (``te``), the portable torch specs with SDPA
    (``torch``), or TE when it imports, else torch (``auto``) (OpenRLHF: --attn_implementation)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation granularity (Megatron/slime: --recompute-granularity; verl:
    enable_gradient_checkpointing)."""
    moe_grouped_gemm: bool = False
    """Grouped expert weights and GEMMs; needs TE or the grouped_gemm package on CUDA
    (Megatron/slime: --moe-grouped-gemm)."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' ranks (Megatron/slime: --moe-token-dispatcher-type).
    megatron-core 0.16 builds ``allgather`` only for fixed sequence lengths, and RL batches vary in
    length, so the config refuses it until Megatron supports it."""
    moe_aux_loss_coeff: Annotated[float, Range(ge=0)] = 0.0
    """Load-balancing auxiliary loss coefficient; 0 disables it, as RL fine-tuning usually does
    (Megatron/slime: --moe-aux-loss-coeff)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss"] = "aux_loss"
    """Which load-balancing loss ``moe_aux_loss_coeff`` weighs: over the micro-batch's tokens, per
    sequence (DeepSeek-V3), or over the global batch (Megatron/slime:
    --moe-router-load-balancing-type)."""
    moe_z_loss_coeff: Annotated[Optional[float], Range(gt=0)] = None
    """Router z-loss coefficient (ST-MoE: keeps router logits small); null disables it
    (Megatron/slime: --moe-z-loss-coeff)."""
    moe_expert_capacity_factor: Annotated[Optional[float], Range(gt=0)] = None
    """Tokens an expert takes, as a multiple of its even share; the rest are dropped (counted in
    ``moe/tokens_dropped``). null: no limit, no token dropped (Megatron/slime:
    --moe-expert-capacity-factor)."""
    moe_router_bias_update_rate: Annotated[float, Range(ge=0)] = 0.0
    """Aux-loss-free load balancing of routers with an expert bias (DeepSeek-V3, GLM-4.5): after each
    optimizer step Megatron moves every expert's bias by this much towards equal load
    (``bias += rate * sign(mean load - load)``). 0 keeps the checkpoint's bias, so the policy routes
    as it was pretrained to; DeepSeek-V3 pretrained with 1e-3, Megatron's default. Other models
    have no expert bias and ignore it (Megatron/slime: --moe-router-bias-update-rate)."""
    freeze_moe_router: bool = False
    """Train every weight but the MoE routing: the routers' gating weights (and biases) and the
    shared experts' gates get no gradient, no gradient buffer and no optimizer state, so the
    experts a token goes to change only as the layers before the router change. Applies to every
    model built from this section (the policy; the critic too when it is trained, and SFT). A dense
    model is refused, and so is moe_router_bias_update_rate > 0, which would still move a frozen
    router's expert bias. A checkpoint resumes whole only with the setting it was saved with (its
    optimizer state has the routers' or not); checkpoint.load_contents=model starts from its weights
    under either (verl: actor_rollout_ref.model.override_config.moe_config.freeze_moe_router)."""
    seed: int = 1234
    """Seed of weight initialisation (new heads) and Megatron's RNG tracker (slime: --seed)."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if not self.path:
            yield "path", "must name a HF model directory or bundled:NAME"
        if self.freeze_moe_router and self.moe_router_bias_update_rate:
            yield "moe_router_bias_update_rate", (
                f"({self.moe_router_bias_update_rate}) would move the expert bias of routers that model.freeze_moe_router "
                "freezes: set it to 0, or model.freeze_moe_router=false"
            )
        if self.moe_token_dispatcher == "allgather":
            yield "moe_token_dispatcher", "(allgather) needs fixed sequence lengths in megatron-core 0.16, and RL batches vary: use alltoall"


def layout_multiple(tensor_parallel: int, sequence_parallel: bool, context_parallel: int) -> int:
    """The multiple a micro-batch's sequence length (padded) or a pack's length (packed) is rounded
    up to: 2 x CP with context parallelism (each rank holds two load-balanced chunks), and CP x TP
    with sequence parallelism (each CP rank's share is split over the TP ranks)."""
    return math.lcm(context_parallel * tensor_parallel if sequence_parallel else 1, 2 * context_parallel if context_parallel > 1 else 1)


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelConfig(Section):
    """The training layout; data parallel is what the world size leaves: world / (TP x PP x CP)."""

    tensor: Annotated[int, Range(ge=1)] = 1
    """TP: ranks that split each layer's weights (Megatron/slime: --tensor-model-parallel-size,
    verl: actor.megatron.tensor_model_parallel_size)."""
    pipeline: Annotated[int, Range(ge=1)] = 1
    """PP: pipeline stages (--pipeline-model-parallel-size)."""
    virtual_pipeline: Annotated[Optional[int], Range(ge=1)] = None
    """VPP: model chunks per pipeline stage for the interleaved 1F1B schedule; null: plain 1F1B
    (--virtual-pipeline-model-parallel-size)."""
    context: Annotated[int, Range(ge=1)] = 1
    """CP: ranks that split each sequence, two load-balanced chunks each (--context-parallel-size)."""
    expert: Annotated[int, Range(ge=1)] = 1
    """EP: ranks that split the experts of each MoE layer (--expert-model-parallel-size)."""
    expert_tensor: Annotated[Optional[int], Range(ge=1)] = None
    """ETP: ranks that split each expert's weights; null: the same as TP, as in Megatron
    (--expert-tensor-parallel-size)."""
    sequence_parallel: bool = False
    """SP: shard the activations outside attention and MLP over the TP group; needs TP > 1
    (--sequence-parallel)."""

    @property
    def expert_tensor_size(self) -> int:
        """ETP as Megatron receives it: ``expert_tensor``, or TP when that is null."""
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def model_parallel(self) -> int:
        """Ranks holding one copy of the dense model: TP x PP x CP."""
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        """DP = world size // (TP x PP x CP); :func:`validate` checks that the division is exact."""
        return world_size // self.model_parallel()

    def for_model(self, model_facts: ModelFacts) -> ParallelConfig:
        """The layout ``model_facts``' model is built under on this layout's process groups: this one
        for an MoE model; for a dense one, this one without expert parallelism (EP 1, ETP unset:
        Megatron refuses EP > 1 without experts), as a dense distillation teacher beside an MoE
        policy is built."""
        return self if model_facts.num_experts else dataclasses.replace(self, expert=1, expert_tensor=None)

    def min_world_size(self) -> int:
        """The smallest world size this layout fits: a multiple of TP x PP x CP (the dense model)
        and of EP x ETP x PP (the experts)."""
        return math.lcm(self.model_parallel(), self.expert * self.expert_tensor_size * self.pipeline)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFacts:
    """The model dimensions validation needs, read from a HF config.json alone (no weights)."""

    num_layers: int
    """Transformer layers (num_hidden_layers)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (num_key_value_heads; equal to the heads without GQA)."""
    num_experts: int
    """Routed experts per MoE layer; 0 for a dense model."""
    vocab_size: int
    """Vocabulary entries (before Megatron pads it)."""
    max_position_embeddings: int
    """Longest sequence the position embedding covers, tokens."""
    latent_widths: tuple[int, ...] = ()
    """Output widths of the multi-latent attention down projections (DeepSeek-V3: ``q_lora_rank``
    when set, ``kv_lora_rank + qk_rope_head_dim``), which TP splits; empty without MLA."""

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelFacts:
        """Read ``path/config.json``.

        Args:
            path: a HF model directory.

        Raises:
            ConfigError: the file is missing, is not JSON, or lacks a required key.
        """
        config_file = Path(path) / "config.json"
        try:
            hf_config = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{config_file} does not exist: a model path must be a HF model directory holding config.json") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_file}: not valid JSON ({error})") from None
        missing = [key for key in ("num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings") if key not in hf_config]
        if missing:
            raise ConfigError(f"{config_file}: missing {', '.join(missing)}")
        experts = hf_config.get("num_experts") or hf_config.get("num_local_experts") or hf_config.get("n_routed_experts") or 0
        return cls(
            num_layers=hf_config["num_hidden_layers"],
            num_attention_heads=hf_config["num_attention_heads"],
            num_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            num_experts=experts,
            vocab_size=hf_config["vocab_size"],
            max_position_embeddings=hf_config["max_position_embeddings"],
            latent_widths=_latent_widths(hf_config),
        )


def _latent_widths(hf_config: dict) -> tuple[int, ...]:
    """:attr:`ModelFacts.latent_widths` of a config.json's fields."""
    if hf_config.get("kv_lora_rank") is None:
        return ()
    query = (hf_config["q_lora_rank"],) if hf_config.get("q_lora_rank") is not None else ()
    return (*query, hf_config["kv_lora_rank"] + hf_config.get("qk_rope_head_dim", 0))


@dataclasses.dataclass(frozen=True, slots=True)
class LayoutSpelling:
    """How the user wrote the layout: the config's keys (``parallel.tensor=2``) or a tool's flags
    (``--tp 2``). Layout errors quote the fields and their fixes in the user's own words."""

    names: Mapping[str, str]
    """ParallelConfig field -> what the user writes (``parallel.tensor``, ``--tp``)."""
    separator: str = "="
    """Between a name and a value in a fix (``parallel.tensor=2``, ``--tp 2``)."""
    unset: str = "set {name}=null"
    """The fix that returns an optional field to its default."""

    def field(self, name: str) -> str:
        return f"`{self.names[name]}`"

    def setting(self, name: str, value: Any) -> str:
        return f"{self.names[name]}{self.separator}{value}"

    def unsetting(self, name: str) -> str:
        return self.unset.format(name=self.names[name])


CONFIG_SPELLING = LayoutSpelling({field.name: f"parallel.{field.name}" for field in dataclasses.fields(ParallelConfig)})


def _dense_world_errors(parallel: ParallelConfig, world_size: int, spelling: LayoutSpelling) -> list[str]:
    """The dense model's ranks must fill the world: TP x PP x CP divides it."""
    name, model_parallel = spelling.field, parallel.model_parallel()
    if world_size % model_parallel == 0:
        return []
    return [
        f"world size ({world_size}) must be TP x PP x CP x DP, but {name('tensor')} ({parallel.tensor}) x "
        f"{name('pipeline')} ({parallel.pipeline}) x {name('context')} ({parallel.context}) = {model_parallel} does not "
        f"divide it: run a multiple of {model_parallel} processes or change the layout"
    ]


def _expert_world_errors(parallel: ParallelConfig, world_size: int, spelling: LayoutSpelling) -> list[str]:
    """The experts' ranks must fill the world too: EP x ETP x PP divides it."""
    name, ep, etp, pp = spelling.field, parallel.expert, parallel.expert_tensor_size, parallel.pipeline
    if world_size % (ep * etp * pp) == 0:
        return []
    return [
        f"{name('expert')} ({ep}) x expert tensor parallel ({etp}) x {name('pipeline')} ({pp}) = "
        f"{ep * etp * pp} must divide the world size ({world_size}): each stage's experts are spread over its "
        f"TP x CP x DP ranks; run {parallel.min_world_size()} processes (or a multiple) or lower {spelling.names['expert']}"
    ]


def world_size_errors(parallel: ParallelConfig, world_size: int, spelling: LayoutSpelling = CONFIG_SPELLING) -> list[str]:
    """What keeps ``parallel`` from forming its process groups on ``world_size`` processes, whatever
    the model: the rules of :func:`layout_errors` that need only the world size (with EP = 1 and
    ETP unset the second follows from the first)."""
    return _dense_world_errors(parallel, world_size, spelling) + _expert_world_errors(parallel, world_size, spelling)


def layout_errors(
    parallel: ParallelConfig, world_size: int, model_facts: ModelFacts, spelling: LayoutSpelling = CONFIG_SPELLING
) -> list[str]:
    """What keeps ``parallel`` from running ``model_facts``' model on ``world_size`` processes, one
    message per problem, each naming the fields (as ``spelling`` writes them), the values and a fix."""
    tp, pp, vpp = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline
    ep, etp = parallel.expert, parallel.expert_tensor_size
    name, setting = spelling.field, spelling.setting
    errors = _dense_world_errors(parallel, world_size, spelling)
    heads, groups = model_facts.num_attention_heads, model_facts.num_query_groups
    if heads % tp:
        errors.append(f"{name('tensor')} ({tp}) must divide the model's attention heads ({heads}): set {spelling.names['tensor']} to {_one_of(_divisors(heads))}")
    if groups % tp and tp % groups:
        # megatron-core splits the key/value heads over the TP ranks, or, with fewer of them than
        # ranks, gives each one to TP / groups ranks.
        fitting = [size for size in _divisors(heads) if groups % size == 0 or size % groups == 0]
        errors.append(
            f"{name('tensor')} ({tp}) and the model's query groups (num_key_value_heads, {groups}) must divide one "
            f"another: set {spelling.names['tensor']} to {_one_of(fitting)}"
        )
    if model_facts.latent_widths and any(width % tp for width in model_facts.latent_widths):
        fitting = [size for size in _divisors(heads) if all(width % size == 0 for width in model_facts.latent_widths)]
        errors.append(
            f"{name('tensor')} ({tp}) must divide the widths of the model's multi-latent attention down projections "
            f"(q_lora_rank, kv_lora_rank + qk_rope_head_dim: {', '.join(map(str, model_facts.latent_widths))}): "
            f"set {spelling.names['tensor']} to {_one_of(fitting)}"
        )
    if model_facts.latent_widths and parallel.context > 1:
        errors.append(
            f"{name('context')} ({parallel.context}) > 1 is not available for multi-latent attention models "
            f"(DeepSeek-V3) in megarl: set {setting('context', 1)}"
        )
    if model_facts.num_experts == 0:
        if ep > 1:
            errors.append(f"{name('expert')} ({ep}) > 1 needs an MoE model, but the model is dense: set {setting('expert', 1)}")
        if parallel.expert_tensor is not None:
            errors.append(f"{name('expert_tensor')} ({parallel.expert_tensor}) is set but the model is dense: {spelling.unsetting('expert_tensor')}")
    else:
        if model_facts.num_experts % ep:
            errors.append(
                f"{name('expert')} ({ep}) must divide the model's experts ({model_facts.num_experts}): "
                f"set {spelling.names['expert']} to {_one_of(_divisors(model_facts.num_experts))}"
            )
        errors += _expert_world_errors(parallel, world_size, spelling)
        if tp > 1 and not parallel.sequence_parallel:
            errors.append(
                f"{name('tensor')} ({tp}) > 1 on an MoE model needs {name('sequence_parallel')} (Megatron's MoE "
                f"layer refuses to train without it): set {setting('sequence_parallel', 'true')}"
            )
        if etp != tp and ep == 1:
            errors.append(
                f"{name('expert_tensor')} ({etp}) != {name('tensor')} ({tp}) needs {name('expert')} > 1 (with "
                f"EP = 1 megatron-core 0.16 reduces expert gradients over the dense data-parallel group only): "
                f"{spelling.unsetting('expert_tensor')} or raise {spelling.names['expert']}"
            )
    if model_facts.num_layers % pp:
        errors.append(
            f"{name('pipeline')} ({pp}) must divide the model's layers ({model_facts.num_layers}): "
            f"set {spelling.names['pipeline']} to {_one_of(_divisors(model_facts.num_layers))}"
        )
    if vpp is not None and pp == 1:
        errors.append(
            f"{name('virtual_pipeline')} ({vpp}) needs {name('pipeline')} > 1: {spelling.unsetting('virtual_pipeline')} "
            f"or raise {spelling.names['pipeline']}"
        )
    elif vpp is not None and model_facts.num_layers % pp == 0 and model_facts.num_layers % (pp * vpp):
        errors.append(
            f"{name('pipeline')} ({pp}) x {name('virtual_pipeline')} ({vpp}) = {pp * vpp} must divide the model's "
            f"layers ({model_facts.num_layers}): set {spelling.names['virtual_pipeline']} to {_one_of(_divisors(model_facts.num_layers // pp))}"
        )
    if parallel.sequence_parallel and tp == 1:
        errors.append(
            f"{name('sequence_parallel')} needs {name('tensor')} > 1: set {setting('sequence_parallel', 'false')} or raise {spelling.names['tensor']}"
        )
    return errors
