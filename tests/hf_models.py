"""Tiny random HuggingFace checkpoints made in the tests with transformers, for the families and
options the bundled models do not cover."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from megarl.config import resolve_model_path

_COMMON = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # Short, so that the 128 positions of the tests reach the scaled frequencies.
    "original_max_position_embeddings": 32,
}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    # q/k/v and o_proj biases.
    "llama-attention-bias": lambda: transformers.LlamaConfig(**_COMMON, attention_bias=True),
    "qwen3-attention-bias": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16, attention_bias=True),
    "llama3-rope": lambda: transformers.LlamaConfig(**_COMMON, rope_parameters=LLAMA3_ROPE),
    # One key/value head: fewer query groups than TP ranks.
    "llama-1-kv-head": lambda: transformers.LlamaConfig(**{**_COMMON, "num_key_value_heads": 1}),
    # Six experts: no expert-parallel size of 4 fits.
    "qwen3-moe-6-experts": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=16, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
    ),
}
# Moonlight-like DeepSeek-V3: queries from one q_proj (q_lora_rank None), MLA keys and values (every
# head has its own: num_key_value_heads = heads), one dense layer, then 8 experts top 3 without a
# group limit and two shared experts.
CONFIGS["moonlight"] = lambda: transformers.DeepseekV3Config(
    **{**_COMMON, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3,
    n_group=1, topk_group=1, n_shared_experts=2, moe_intermediate_size=32, routed_scaling_factor=2.446,
    tie_word_embeddings=False,
)
UNSUPPORTED = {
    # An architecture no family serves, and an option value the Llama family does not implement.
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "llama-gelu": lambda: transformers.LlamaConfig(**_COMMON, hidden_act="gelu"),
}
"""Models megarl must refuse (made like those of CONFIGS)."""


def make_tiny(name: str, directory: Path) -> None:
    """Save a random tiny checkpoint of ``CONFIGS[name]`` (or ``UNSUPPORTED[name]``) with random biases, expert
    biases included (so that a dropped or misplaced bias shows in the logits)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config({**CONFIGS, **UNSUPPORTED}[name]())
    with torch.no_grad():
        for parameter_name, param in model.named_parameters():
            if parameter_name.endswith("bias"):
                param.normal_()
        # A sigmoid router's expert bias is a buffer (transformers initialises it to 0).
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.05)
    model.save_pretrained(directory)


def model_dir(directory: Path, model: str) -> str:
    """A bundled model's directory (``bundled:NAME``), or the tiny checkpoint ``model`` of
    :data:`CONFIGS` or :data:`UNSUPPORTED`, made under ``directory`` the first time it is asked for."""
    if model.startswith("bundled:"):
        return str(resolve_model_path(model))
    path = directory / "hf-models" / model
    if not path.exists():
        make_tiny(model, path)
    return str(path)
