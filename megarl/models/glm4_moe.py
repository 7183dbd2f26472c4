"""GLM-4.5 MoE (transformers' ``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, GLM-4.6).

A Llama-style decoder with grouped-query attention, q/k/v biases (``attention_bias``; ``o_proj``
never has one), optional per-head q/k RMSNorm (``use_qk_norm``), and partial rotary embedding:
transformers rotates the first ``int(head_dim * partial_rotary_factor)`` dimensions of each head
(0.5 in the released configs), pairing dimension ``i`` with ``i + rotary_dim / 2`` (``rotate_half``)
and passing the rest through, which is Megatron's ``rotary_percent`` with ``rotary_interleaved``
off. The first ``first_k_dense_replace`` layers have a dense MLP, the others the DeepSeek-style MoE
block (:mod:`megarl.models.deepseek_moe`: sigmoid router with expert bias, group-limited top-k,
``routed_scaling_factor``, an ungated shared expert).

Multi-token-prediction layers (``num_nextn_predict_layers``, stored at
``model.layers.{num_hidden_layers + i}.*`` in the released checkpoints) are loaded past and not
trained: the loader accepts their tensors, the Megatron model has no such layers, and neither the
exporter nor the weight stream writes them (an exported checkpoint has none; an engine that
speculates with them keeps the ones it loaded at start).
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
    DECODER_OPTIONS,
    ModelFamily,
    Option,
    decoder_fields,
    decoder_weight_rules,
    partial_rotary_factor,
)
from megarl.models.llama import attention_bias


def _qk_norm(hf_config) -> bool:
    return bool(getattr(hf_config, "use_qk_norm", False))


def _fields(hf_config) -> dict[str, Any]:
    return {
        **decoder_fields(hf_config, qkv_bias=attention_bias(hf_config)),
        "qk_layernorm": _qk_norm(hf_config),
        **deepseek_moe_fields(hf_config),
    }


def _weight_rules(hf_config):
    return decoder_weight_rules(
        hf_config,
        deepseek_moe_layers(hf_config),
        qkv_bias=attention_bias(hf_config),
        qk_norm=_qk_norm(hf_config),
        moe_block_rules=lambda mg_prefix, hf_prefix: deepseek_moe_rules(hf_config, mg_prefix, hf_prefix),
    )


GLM4_MOE_OPTIONS = (
    *(option for option in DECODER_OPTIONS if option.key != "partial_rotary_factor"),
    # GLM's rotary embedding honours the factor (Glm4MoeRotaryEmbedding), Llama's does not.
    Option("partial_rotary_factor", (0.5, 1.0), read=partial_rotary_factor),
    *DEEPSEEK_MOE_OPTIONS,
)

GLM4_MOE = ModelFamily(
    name="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    config_fields=_fields,
    moe_layers=deepseek_moe_layers,
    weight_rules=_weight_rules,
    options=GLM4_MOE_OPTIONS,
    ignored_hf_tensors=mtp_layer_prefixes,
)
