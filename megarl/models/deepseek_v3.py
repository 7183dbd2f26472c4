"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; also Moonlight and Kimi-style models): multi-latent
attention (MLA) over a Llama-style decoder, with dense first layers.

Attention. Queries come from ``q_a_proj -> q_a_layernorm -> q_b_proj`` (a low-rank "LoRA" of
rank ``q_lora_rank``), or from one ``q_proj`` when ``q_lora_rank`` is None (Moonlight). Keys and
values share one compressed latent: ``kv_a_proj_with_mqa`` gives ``kv_lora_rank`` latent entries
plus one ``qk_rope_head_dim`` rotary key shared by all heads; the latent is normalised
(``kv_a_layernorm``) and ``kv_b_proj`` expands it into each head's key (``qk_nope_head_dim``
entries without position) and value (``v_head_dim``). Each head's query and key are the position
-free part followed by the rotary part; the softmax scale is ``(qk_nope + qk_rope)^-0.5``.

Megatron-core implements exactly this as ``MLASelfAttention`` (``multi_latent_attention=True``):
``linear_q_down_proj``, ``q_layernorm``, ``linear_q_up_proj`` (or ``linear_q_proj``),
``linear_kv_down_proj``, ``kv_layernorm``, ``linear_kv_up_proj``, ``linear_proj``, with the same
row layouts (per head: position-free rows, then rotary rows; the latent before the rotary key), so
every rule is a plain column- or row-parallel split and the up projections split by heads.
Megatron's MLA rotary de-interleaves the rotary entries (even, then odd) before rotating: that is
transformers' ``rope_interleave=True`` (the default and what DeepSeek-V3 and Moonlight use), so the
weights map unchanged; ``rope_interleave=False`` is refused. Rope scaling: the default rope (its
frequencies are transformers', :func:`megarl.models.family.rotary_inv_freq`, copied into every MLA
layer by the builder); ``yarn`` (DeepSeek-V3 671B's, which also scales the softmax through
``mscale``) is refused by an :class:`~megarl.models.family.Option` rather than converted wrong.

Layers ``0 .. first_k_dense_replace - 1`` have a dense MLP (``intermediate_size``); the others the
DeepSeek MoE block (:mod:`megarl.models.deepseek_moe`: sigmoid router with expert bias,
group-limited top-k, routed scaling, shared experts).

MTP layers (``num_nextn_predict_layers``) are loaded and ignored: real checkpoints store them as
``model.layers.{num_hidden_layers + i}.*``; transformers does not build them and neither does
megarl. The loader accepts those tensors, the exporter does not write them and the weight stream
does not send them (an engine that runs MTP speculative decoding keeps the checkpoint's).
"""

from __future__ import annotations

from typing import Any

from megarl.models.deepseek_moe import (
    DEEPSEEK_MOE_OPTIONS,
    deepseek_moe_fields,
    deepseek_moe_layers,
    deepseek_moe_rules,
    mtp_layer_prefixes,
)
from megarl.models.family import (
    ModelFamily,
    Option,
    decoder_fields,
    embedding_rules,
    rope_parameters,
    rope_theta,
    swiglu_mlp_rules,
)
from megarl.models.mapping import ColumnParallel, Replicated, RowParallel, Rule


def _rope_type(hf_config) -> str:
    return rope_parameters(hf_config).get("rope_type", "default")


DEEPSEEK_V3_OPTIONS = (
    Option("hidden_act", ("silu",), default="silu"),
    Option("attention_bias", (False,), default=False),
    # Megatron's MLA rotates (even, odd) pairs of the rotary entries: transformers' interleaved rope.
    Option("rope_interleave", (True,), default=True),
    # yarn also scales cos/sin and the softmax (mscale); only frequencies-only rope is copied exactly.
    Option("rope type", ("default",), read=_rope_type),
    *DEEPSEEK_MOE_OPTIONS,
)
"""The HF config options of DeepSeek-V3 that change the computation, and the values megarl implements."""


def mla_fields(hf_config) -> dict[str, Any]:
    """``MLATransformerConfig`` fields of DeepSeek's multi-latent attention with the default rope."""
    return {
        "multi_latent_attention": True,
        "q_lora_rank": hf_config.q_lora_rank,
        "kv_lora_rank": hf_config.kv_lora_rank,
        # Megatron's qk_head_dim is the position-free part only.
        "qk_head_dim": hf_config.qk_nope_head_dim,
        "qk_pos_emb_head_dim": hf_config.qk_rope_head_dim,
        "v_head_dim": hf_config.v_head_dim,
        # Every head has its own keys and values (expanded from the shared latent).
        "num_query_groups": hf_config.num_attention_heads,
        # The core attention's output width per head.
        "kv_channels": hf_config.v_head_dim,
        "rope_type": "rope",
        "rotary_base": rope_theta(hf_config),
        # No yarn: Megatron's softmax scale is then mscale(1)^2 / sqrt(qk_nope + qk_rope), as HF's.
        "rotary_scaling_factor": 1.0,
    }


def _fields(hf_config) -> dict[str, Any]:
    return {**decoder_fields(hf_config, qkv_bias=False), **mla_fields(hf_config), **deepseek_moe_fields(hf_config)}


def mla_rules(hf_config, layer: int) -> list[Rule]:
    """Mapping rules of one layer's multi-latent attention (portable spec names; TE's fused norm
    names are translated by :func:`megarl.models.loader.canonical_name`)."""
    mg, hf = f"decoder.layers.{layer}.self_attention.", f"model.layers.{layer}.self_attn."
    if hf_config.q_lora_rank is None:
        query = [ColumnParallel(f"{mg}linear_q_proj.weight", (f"{hf}q_proj.weight",))]
    else:
        query = [
            # The down projections are column-parallel in megarl's specs (Megatron gathers their
            # output), so that TP splits every MLA weight and the rules serve both backends.
            ColumnParallel(f"{mg}linear_q_down_proj.weight", (f"{hf}q_a_proj.weight",)),
            Replicated(f"{mg}q_layernorm.weight", (f"{hf}q_a_layernorm.weight",)),
            ColumnParallel(f"{mg}linear_q_up_proj.weight", (f"{hf}q_b_proj.weight",)),
        ]
    return query + [
        ColumnParallel(f"{mg}linear_kv_down_proj.weight", (f"{hf}kv_a_proj_with_mqa.weight",)),
        Replicated(f"{mg}kv_layernorm.weight", (f"{hf}kv_a_layernorm.weight",)),
        ColumnParallel(f"{mg}linear_kv_up_proj.weight", (f"{hf}kv_b_proj.weight",)),
        RowParallel(f"{mg}linear_proj.weight", (f"{hf}o_proj.weight",)),
    ]


def _weight_rules(hf_config) -> list[Rule]:
    rules = embedding_rules(hf_config)
    for layer, is_moe in enumerate(deepseek_moe_layers(hf_config)):
        mg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        rules += [
            Replicated(f"{mg}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
            *mla_rules(hf_config, layer),
            Replicated(f"{mg}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        ]
        rules += deepseek_moe_rules(hf_config, mg, hf) if is_moe else swiglu_mlp_rules(f"{mg}mlp.", f"{hf}mlp.")
    return rules


DEEPSEEK_V3 = ModelFamily(
    name="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    config_fields=_fields,
    moe_layers=deepseek_moe_layers,
    weight_rules=_weight_rules,
    options=DEEPSEEK_V3_OPTIONS,
    ignored_hf_tensors=mtp_layer_prefixes,
)
