"""Model families: how a HuggingFace architecture becomes a Megatron model.

A family is data plus small functions: which HF ``architectures`` it serves, how its HF config maps
to Megatron's ``TransformerConfig`` fields, which layers are MoE, and the weight mapping rules
(:mod:`megarl.models.mapping`). Families register themselves with :func:`register_family`;
:func:`family_of` finds the one for a HF config.

Llama-style decoders share :func:`decoder_fields` and :func:`decoder_weight_rules`
(``llama.py``: Llama, Qwen2; ``qwen3.py``: Qwen3, Qwen3-MoE; ``qwen2_moe.py``). The next family,
DeepSeek-V3, adds a module of its own: multi-latent attention (``multi_latent_attention=True`` with
its q/kv LoRA ranks), MLA mapping rules (``linear_q_down_proj``, ``linear_kv_down_proj``,
``linear_kv_up_proj`` ... from ``q_a_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``), the
sigmoid router with expert bias (``moe_router_score_function="sigmoid"``,
``moe_router_enable_expert_bias``), group-limited routing and the first dense layers
(``first_k_dense_replace``); the layer specs then need Megatron's MLA modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn.functional as F

from megarl.models.mapping import (
    FusedGateUp,
    FusedQKV,
    Replicated,
    RowParallel,
    Rule,
    VocabParallel,
)

_FAMILIES: dict[str, ModelFamily] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFamily:
    """How one HF architecture maps onto Megatron."""

    name: str
    """Short name, e.g. ``qwen3_moe``."""
    architectures: tuple[str, ...]
    """HF ``config.architectures`` entries this family serves."""
    config_fields: Callable[[Any], dict[str, Any]]
    """HF config -> the architecture's ``TransformerConfig`` keyword arguments."""
    moe_layers: Callable[[Any], list[bool]]
    """HF config -> for each layer, whether it is an MoE layer."""
    weight_rules: Callable[[Any], list[Rule]]
    """HF config -> the weight mapping rules (per-layer rules with the layer filled in, expert
    rules templated on ``{expert}``)."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry, keyed by each HF architecture name it serves."""
    for architecture in family.architectures:
        if architecture in _FAMILIES:
            raise ValueError(f"architecture {architecture} is already served by {_FAMILIES[architecture].name}")
        _FAMILIES[architecture] = family
    return family


def family_of(hf_config) -> ModelFamily:
    """The family serving ``hf_config.architectures``; a clear error when none does."""
    # Importing the family modules registers them.
    from megarl.models import llama, qwen2_moe, qwen3  # noqa: F401

    architectures = list(getattr(hf_config, "architectures", None) or [])
    for architecture in architectures:
        if architecture in _FAMILIES:
            return _FAMILIES[architecture]
    raise ValueError(
        f"no megarl model family serves architectures {architectures}; supported: "
        f"{sorted(_FAMILIES)}. Add a family in megarl/models/ (see megarl/models/qwen3.py)."
    )


def rope_theta(hf_config) -> float:
    """The rotary base, from ``rope_theta`` (transformers 4) or ``rope_parameters`` (5)."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    scaling = getattr(hf_config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(
            f"rope type {rope_type!r} / rope_scaling {scaling!r} is not supported yet; megarl "
            f"supports the default rotary embedding"
        )
    theta = getattr(hf_config, "rope_theta", None) or parameters.get("rope_theta")
    if theta is None:
        raise ValueError("the HF config has neither rope_theta nor rope_parameters['rope_theta']")
    return float(theta)


def decoder_fields(hf_config, *, qkv_bias: bool) -> dict[str, Any]:
    """``TransformerConfig`` fields shared by Llama-style decoders (pre-norm RMSNorm, SwiGLU,
    rotary embedding, grouped-query attention).

    Args:
        hf_config: the HF config.
        qkv_bias: the q/k/v projections have biases (Qwen2); o_proj and the MLP never do.
    """
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported; expected 'silu'")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: Megatron's fused gate/up layer has no bias")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
    )


def dense_layers(hf_config) -> list[bool]:
    """No MoE layer."""
    return [False] * hf_config.num_hidden_layers


def qwen_moe_layers(hf_config) -> list[bool]:
    """Qwen MoE layer pattern: layer i is sparse unless listed in ``mlp_only_layers``, and only
    every ``decoder_sparse_step``-th layer is (``(i + 1) % step == 0``)."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)]


def qwen_moe_fields(hf_config) -> dict[str, Any]:
    """``TransformerConfig`` MoE fields of Qwen2-MoE and Qwen3-MoE routing (softmax, top-k)."""
    return {
        # transformers 5 names it num_local_experts, 4 named it num_experts.
        "num_moe_experts": getattr(hf_config, "num_local_experts", None) or hf_config.num_experts,
        "moe_router_topk": hf_config.num_experts_per_tok,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        # HF takes the softmax over all experts, then the top k. That equals Megatron's default
        # (top k, then softmax over the k chosen) when HF renormalises the top-k weights;
        # without renormalisation Megatron must take the softmax first.
        "moe_router_pre_softmax": not hf_config.norm_topk_prob,
        "moe_router_score_function": "softmax",
        # HF computes the routing softmax in float32.
        "moe_router_dtype": "fp32",
        "moe_layer_freq": [int(is_moe) for is_moe in qwen_moe_layers(hf_config)],
    }


def decoder_weight_rules(
    hf_config,
    moe_layers: list[bool],
    *,
    qkv_bias: bool,
    qk_norm: bool = False,
    shared_expert: bool = False,
) -> list[Rule]:
    """Mapping rules of a Llama-style decoder (Llama, Qwen2, Qwen3 and their MoE variants).

    Megatron names are those of megarl's portable layer spec; Transformer Engine's fused names
    are translated to them by :func:`megarl.models.loader.canonical_name`.

    Args:
        hf_config: the HF config.
        moe_layers: whether each layer is MoE.
        qkv_bias: the q/k/v projections have biases (Qwen2).
        qk_norm: per-head q/k RMSNorm (Qwen3).
        shared_expert: a shared expert with a sigmoid gate beside the routed experts (Qwen2-MoE).
    """
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    qkv = dict(num_query_groups=groups, heads_per_group=heads // groups, head_dim=head_dim)
    vocab = hf_config.vocab_size
    rules: list[Rule] = [
        VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab_size=vocab),
        Replicated("decoder.final_layernorm.weight", ("model.norm.weight",)),
        # With tied embeddings the last pipeline stage still holds its own copy of the embedding as
        # the output layer; it loads from (and exports to) the same HF tensor.
        VocabParallel(
            "output_layer.weight",
            ("model.embed_tokens.weight" if hf_config.tie_word_embeddings else "lm_head.weight",),
            vocab_size=vocab,
        ),
    ]
    for layer, is_moe in enumerate(moe_layers):
        mg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attention = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        rules += [
            Replicated(f"{mg}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
            FusedQKV(f"{mg}self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in attention), **qkv),
            RowParallel(f"{mg}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
            Replicated(f"{mg}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        ]
        if qkv_bias:
            rules.append(
                FusedQKV(f"{mg}self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in attention), **qkv)
            )
        if qk_norm:
            rules += [
                Replicated(f"{mg}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
                Replicated(f"{mg}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",)),
            ]
        if not is_moe:
            rules += [
                FusedGateUp(f"{mg}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight")),
                RowParallel(f"{mg}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",)),
            ]
            continue
        expert_mg, expert_hf = f"{mg}mlp.experts.local_experts.{{expert}}.", f"{hf}mlp.experts.{{expert}}."
        rules += [
            Replicated(f"{mg}mlp.router.weight", (f"{hf}mlp.gate.weight",)),
            FusedGateUp(f"{expert_mg}linear_fc1.weight", (f"{expert_hf}gate_proj.weight", f"{expert_hf}up_proj.weight")),
            RowParallel(f"{expert_mg}linear_fc2.weight", (f"{expert_hf}down_proj.weight",)),
        ]
        if shared_expert:
            shared_mg, shared_hf = f"{mg}mlp.shared_experts.", f"{hf}mlp.shared_expert."
            rules += [
                FusedGateUp(f"{shared_mg}linear_fc1.weight", (f"{shared_hf}gate_proj.weight", f"{shared_hf}up_proj.weight")),
                RowParallel(f"{shared_mg}linear_fc2.weight", (f"{shared_hf}down_proj.weight",)),
                Replicated(f"{shared_mg}gate_weight", (f"{hf}mlp.shared_expert_gate.weight",)),
            ]
    return rules
