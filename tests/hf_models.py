"""Tiny random HuggingFace checkpoints made in the tests with transformers, for the families and
options the bundled models do not cover."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

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
    # GLM-4.5 without q/k norm or q/k/v biases, whole-head rotary, no group limit, every layer MoE
    # with two shared experts; its one multi-token-prediction layer's tensors are in the checkpoint.
    "glm4-moe-variant": lambda: transformers.Glm4MoeConfig(
        **_COMMON, head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, n_shared_experts=2, first_k_dense_replace=0, use_qk_norm=False, attention_bias=False,
        partial_rotary_factor=1.0, num_nextn_predict_layers=1,
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
    biases included (so that a dropped or misplaced bias shows in the logits), and the multi-token-prediction
    layers its config announces."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config({**CONFIGS, **UNSUPPORTED}[name]())
    with torch.no_grad():
        for parameter_name, param in model.named_parameters():
            if parameter_name.endswith("bias"):
                param.normal_()
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                # A fresh router's sigmoid scores differ by hundredths: a larger bias would choose
                # the same experts for every token.
                buffer.normal_(std=0.05)
    model.save_pretrained(directory)
    if getattr(model.config, "num_nextn_predict_layers", 0):
        add_mtp_layers(directory / "model.safetensors", model.config)


def add_mtp_layers(checkpoint: Path, config) -> None:
    """Add multi-token-prediction layers as GLM-4.5 and DeepSeek-V3 checkpoints store them (a
    decoder layer plus its input projection and norms at ``model.layers.{num_hidden_layers + i}``),
    which transformers' models do not build."""
    tensors = load_file(checkpoint)
    last = f"model.layers.{config.num_hidden_layers - 1}."
    hidden = config.hidden_size
    for index in range(config.num_nextn_predict_layers):
        mtp = f"model.layers.{config.num_hidden_layers + index}."
        tensors.update({mtp + name[len(last) :]: torch.randn_like(tensor) for name, tensor in tensors.items() if name.startswith(last)})
        tensors.update({
            f"{mtp}eh_proj.weight": torch.randn(hidden, 2 * hidden), f"{mtp}enorm.weight": torch.ones(hidden),
            f"{mtp}hnorm.weight": torch.ones(hidden), f"{mtp}shared_head.norm.weight": torch.ones(hidden),
        })
    save_file(tensors, checkpoint, metadata={"format": "pt"})


def model_dir(directory: Path, model: str) -> str:
    """A bundled model's directory (``bundled:NAME``), or the tiny checkpoint ``model`` of
    :data:`CONFIGS` or :data:`UNSUPPORTED`, made under ``directory`` the first time it is asked for."""
    if model.startswith("bundled:"):
        return str(resolve_model_path(model))
    path = directory / "hf-models" / model
    if not path.exists():
        make_tiny(model, path)
    return str(path)


def router_choices(model, tokens: list[int]) -> dict[int, torch.Tensor]:
    """Per MoE layer of a transformers model, ``[len(tokens), topk]``: the experts its router
    (``layers.N.mlp.gate``, which returns ``(logits, weights, indices)``) chose in one forward over
    ``tokens``."""
    from megarl.rollout.embedded.routing import _GATE_NAME

    captured, hooks = {}, []
    for name, module in model.named_modules():
        match = _GATE_NAME.search(name)
        if match:
            hooks.append(module.register_forward_hook(lambda module, args, output, layer=int(match.group(1)): captured.__setitem__(layer, output[2])))
    try:
        with torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        for hook in hooks:
            hook.remove()
    return captured
