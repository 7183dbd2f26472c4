"""Qwen2-MoE: routed experts plus a shared expert whose output is scaled by a sigmoid gate."""

from __future__ import annotations

from typing import Any

from megarl.models.family import (
    DECODER_OPTIONS,
    ModelFamily,
    decoder_fields,
    decoder_weight_rules,
    qwen_moe_fields,
    qwen_moe_layers,
)


def _qkv_bias(hf_config) -> bool:
    return bool(getattr(hf_config, "qkv_bias", True))


def _fields(hf_config) -> dict[str, Any]:
    return {
        **decoder_fields(hf_config, qkv_bias=_qkv_bias(hf_config)),
        **qwen_moe_fields(hf_config),
        "moe_shared_expert_intermediate_size": hf_config.shared_expert_intermediate_size,
        # out = moe(x) + sigmoid(x . w_gate) * shared_expert(x), as HF's shared_expert_gate.
        "moe_shared_expert_gate": True,
    }


QWEN2_MOE = ModelFamily(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    config_fields=_fields,
    moe_layers=qwen_moe_layers,
    weight_rules=lambda hf_config: decoder_weight_rules(
        hf_config, qwen_moe_layers(hf_config), qkv_bias=_qkv_bias(hf_config), shared_expert=True
    ),
    options=DECODER_OPTIONS,
)
