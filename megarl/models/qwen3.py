"""Qwen3 (dense, per-head q/k RMSNorm) and Qwen3-MoE (top-k routed experts, no shared expert)."""

from __future__ import annotations

from typing import Any

from megarl.models.family import (
    ModelFamily,
    decoder_fields,
    decoder_weight_rules,
    dense_layers,
    qwen_moe_fields,
    qwen_moe_layers,
    register_family,
)


def _qwen3_fields(hf_config) -> dict[str, Any]:
    return {**decoder_fields(hf_config, qkv_bias=False), "qk_layernorm": True}


def _qwen3_moe_fields(hf_config) -> dict[str, Any]:
    return {**_qwen3_fields(hf_config), **qwen_moe_fields(hf_config)}


QWEN3 = register_family(
    ModelFamily(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        config_fields=_qwen3_fields,
        moe_layers=dense_layers,
        weight_rules=lambda hf_config: decoder_weight_rules(
            hf_config, dense_layers(hf_config), qkv_bias=False, qk_norm=True
        ),
    )
)

QWEN3_MOE = register_family(
    ModelFamily(
        name="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        config_fields=_qwen3_moe_fields,
        moe_layers=qwen_moe_layers,
        weight_rules=lambda hf_config: decoder_weight_rules(
            hf_config, qwen_moe_layers(hf_config), qkv_bias=False, qk_norm=True
        ),
    )
)
