"""Qwen3 (dense, per-head q/k RMSNorm) and Qwen3-MoE (top-k routed experts, no shared expert);
``attention_bias`` gives q/k/v and o_proj biases, as in Llama."""

from __future__ import annotations

from typing import Any

from megarl.models.family import (
    DECODER_OPTIONS,
    ModelFamily,
    decoder_fields,
    decoder_weight_rules,
    dense_layers,
    qwen_moe_fields,
    qwen_moe_layers,
)
from megarl.models.llama import attention_bias


def _qwen3_fields(hf_config) -> dict[str, Any]:
    return {**decoder_fields(hf_config, qkv_bias=attention_bias(hf_config)), "qk_layernorm": True}


def _qwen3_moe_fields(hf_config) -> dict[str, Any]:
    return {**_qwen3_fields(hf_config), **qwen_moe_fields(hf_config)}


def _weight_rules(moe_layers):
    return lambda hf_config: decoder_weight_rules(
        hf_config, moe_layers(hf_config), qkv_bias=attention_bias(hf_config), proj_bias=attention_bias(hf_config), qk_norm=True
    )


QWEN3 = ModelFamily(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    config_fields=_qwen3_fields,
    moe_layers=dense_layers,
    weight_rules=_weight_rules(dense_layers),
    options=DECODER_OPTIONS,
    attention_output_bias=attention_bias,
)

QWEN3_MOE = ModelFamily(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    config_fields=_qwen3_moe_fields,
    moe_layers=qwen_moe_layers,
    weight_rules=_weight_rules(qwen_moe_layers),
    options=DECODER_OPTIONS,
    attention_output_bias=attention_bias,
)
