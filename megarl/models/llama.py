"""Llama and Qwen2 (dense): Llama-style decoders. Llama's ``attention_bias`` gives q/k/v and
o_proj biases; Qwen2 always has q/k/v biases and none on o_proj."""

from __future__ import annotations

from megarl.models.family import (
    DECODER_OPTIONS,
    ModelFamily,
    decoder_fields,
    decoder_weight_rules,
    dense_layers,
)


def attention_bias(hf_config) -> bool:
    """``attention_bias``: biases on q/k/v and on o_proj (Llama, Qwen3)."""
    return bool(getattr(hf_config, "attention_bias", False))


LLAMA = ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM",),
    config_fields=lambda hf_config: decoder_fields(hf_config, qkv_bias=attention_bias(hf_config)),
    moe_layers=dense_layers,
    weight_rules=lambda hf_config: decoder_weight_rules(
        hf_config, dense_layers(hf_config), qkv_bias=attention_bias(hf_config), proj_bias=attention_bias(hf_config)
    ),
    options=DECODER_OPTIONS,
    attention_output_bias=attention_bias,
)

QWEN2 = ModelFamily(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    config_fields=lambda hf_config: decoder_fields(hf_config, qkv_bias=True),
    moe_layers=dense_layers,
    weight_rules=lambda hf_config: decoder_weight_rules(hf_config, dense_layers(hf_config), qkv_bias=True),
    options=DECODER_OPTIONS,
)
