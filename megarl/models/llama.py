"""Llama and Qwen2 (dense): Llama-style decoders; Qwen2 adds biases to the q/k/v projections."""

from __future__ import annotations

from megarl.models.family import (
    ModelFamily,
    decoder_fields,
    decoder_weight_rules,
    dense_layers,
    register_family,
)


def _llama_qkv_bias(hf_config) -> bool:
    return bool(getattr(hf_config, "attention_bias", False))


LLAMA = register_family(
    ModelFamily(
        name="llama",
        architectures=("LlamaForCausalLM",),
        config_fields=lambda hf_config: decoder_fields(hf_config, qkv_bias=_llama_qkv_bias(hf_config)),
        moe_layers=dense_layers,
        weight_rules=lambda hf_config: decoder_weight_rules(
            hf_config, dense_layers(hf_config), qkv_bias=_llama_qkv_bias(hf_config)
        ),
    )
)

QWEN2 = register_family(
    ModelFamily(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        config_fields=lambda hf_config: decoder_fields(hf_config, qkv_bias=True),
        moe_layers=dense_layers,
        weight_rules=lambda hf_config: decoder_weight_rules(hf_config, dense_layers(hf_config), qkv_bias=True),
    )
)
