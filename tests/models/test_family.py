"""Model families refuse the HF config options they do not implement, naming option and value,
rather than build a model that computes something else."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from megarl.models.families import checked_family
from megarl.models.family import UnsupportedModel, rotary_inv_freq
from tests.hf_models import CONFIGS, LLAMA3_ROPE

pytestmark = pytest.mark.cpu


def llama(**options):
    config = CONFIGS["llama"]()
    config.architectures = ["LlamaForCausalLM"]
    for key, value in options.items():
        setattr(config, key, value)
    return config


def with_architecture(config, architecture: str):
    config.architectures = [architecture]
    return config


@pytest.mark.parametrize(
    "config,expected",
    [
        (llama(hidden_act="gelu"), "hidden_act = 'gelu' is not supported by megarl's llama family (it implements 'silu')"),
        (llama(mlp_bias=True), "mlp_bias = True is not supported"),
        (
            llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
            "rope type = 'yarn' is not supported by megarl's llama family (it implements 'default' or 'linear' or 'llama3')",
        ),
        (llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "rope type = 'dynamic'"),
        (
            with_architecture(transformers.Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0), "Qwen2ForCausalLM"),
            "attention layer types = 'sliding_attention' is not supported by megarl's qwen2 family",
        ),
        (with_architecture(transformers.MistralConfig(), "MistralForCausalLM"), "no megarl model family serves architectures ['MistralForCausalLM']"),
    ],
    ids=["hidden_act", "mlp_bias", "yarn", "dynamic-rope", "sliding-window", "architecture"],
)
def test_unsupported_options_are_refused_by_name(config, expected):
    with pytest.raises(UnsupportedModel, match=re.escape(expected)):
        checked_family(config)


def test_every_problem_is_named_at_once():
    with pytest.raises(UnsupportedModel) as refused:
        checked_family(llama(hidden_act="relu", mlp_bias=True))
    assert "hidden_act = 'relu'" in str(refused.value) and "mlp_bias = True" in str(refused.value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_families_of_the_test_models_accept_them(name):
    config = CONFIGS[name]()
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    assert checked_family(config).name in ("llama", "qwen2", "qwen3", "qwen3_moe", "glm4_moe", "deepseek_v3")


def test_rotary_frequencies_are_transformers_own_with_llama3_scaling():
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=LLAMA3_ROPE)
    default = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    scaled, plain = rotary_inv_freq(config), rotary_inv_freq(default)
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert torch.equal(plain, base)
    # llama3 keeps the high frequencies and divides the low ones by the factor.
    assert scaled[0] == plain[0] and torch.allclose(scaled[-1], plain[-1] / 8)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotary_frequencies_equal_those_of_transformers_rotary_embedding(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = CONFIGS[name]()
    assert torch.equal(rotary_inv_freq(config), LlamaRotaryEmbedding(config=config).inv_freq.float())
    scaled = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=LLAMA3_ROPE)
    assert torch.equal(rotary_inv_freq(scaled), LlamaRotaryEmbedding(config=scaled).inv_freq.float())


def glm4_moe(**options):
    config = with_architecture(CONFIGS["glm4-moe-variant"](), "Glm4MoeForCausalLM")
    for key, value in options.items():
        setattr(config, key, value)
    return config


def test_glm_implements_half_rotary_heads_and_refuses_other_fractions_and_routers():
    assert checked_family(glm4_moe(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})).name == "glm4_moe"
    refused = "partial_rotary_factor = 0.25 is not supported by megarl's glm4_moe family (it implements 0.5 or 1.0)"
    with pytest.raises(UnsupportedModel, match=re.escape(refused)):
        checked_family(glm4_moe(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}))
    with pytest.raises(UnsupportedModel, match=re.escape("norm_topk_prob = False is not supported by megarl's glm4_moe family")):
        checked_family(glm4_moe(norm_topk_prob=False))
    # The Llama-style families rotate whole heads only.
    with pytest.raises(UnsupportedModel, match=re.escape("partial_rotary_factor = 0.5 is not supported by megarl's llama family")):
        checked_family(llama(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}))


def test_partial_rotary_frequencies_equal_those_of_glm_rotary_embedding():
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding

    config = glm4_moe(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    inv_freq = rotary_inv_freq(config)
    assert inv_freq.shape == (4,) and torch.equal(inv_freq, Glm4MoeRotaryEmbedding(config=config).inv_freq.float())
