"""The DeepSeek-V3 family: multi-latent attention fields and rules, the options it refuses, its MTP
layers loaded past, and the layouts that split its latent projections."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megarl.config import ParallelConfig
from megarl.config.model import ModelFacts, layout_errors
from megarl.models.families import checked_family
from megarl.models.family import UnsupportedModel
from megarl.models.loader import CheckpointError, HFCheckpoint, canonical_name

pytestmark = pytest.mark.cpu


def deepseek_v3(**options):
    """A tiny DeepSeek-V3 config (8 experts top 2 in 2 groups, one kept)."""
    values = dict(
        vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=1, num_nextn_predict_layers=1, architectures=["DeepseekV3ForCausalLM"],
    )
    return transformers.DeepseekV3Config(**{**values, **options})


def test_mla_fields():
    fields = checked_family(deepseek_v3()).config_fields(deepseek_v3())
    assert {key: fields[key] for key in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")} == {
        "multi_latent_attention": True, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16,
    }
    assert (fields["rope_type"], fields["rotary_scaling_factor"], fields["num_query_groups"]) == ("rope", 1.0, 4)
    assert fields["num_moe_experts"] == 8 and fields["moe_layer_freq"] == [0, 1, 1]


def attention_rules(config, layer=1):
    rules = checked_family(config).weight_rules(config)
    prefix = f"decoder.layers.{layer}.self_attention."
    return [(type(rule).__name__, rule.megatron.removeprefix(prefix), rule.hf) for rule in rules if rule.megatron.startswith(prefix)]


def test_mla_rules_with_and_without_a_query_lora():
    hf = "model.layers.1.self_attn."
    assert attention_rules(deepseek_v3()) == [
        ("ColumnParallel", "linear_q_down_proj.weight", (f"{hf}q_a_proj.weight",)),
        ("Replicated", "q_layernorm.weight", (f"{hf}q_a_layernorm.weight",)),
        ("ColumnParallel", "linear_q_up_proj.weight", (f"{hf}q_b_proj.weight",)),
        ("ColumnParallel", "linear_kv_down_proj.weight", (f"{hf}kv_a_proj_with_mqa.weight",)),
        ("Replicated", "kv_layernorm.weight", (f"{hf}kv_a_layernorm.weight",)),
        ("ColumnParallel", "linear_kv_up_proj.weight", (f"{hf}kv_b_proj.weight",)),
        ("RowParallel", "linear_proj.weight", (f"{hf}o_proj.weight",)),
    ]
    moonlight = attention_rules(deepseek_v3(q_lora_rank=None))
    assert moonlight[0] == ("ColumnParallel", "linear_q_proj.weight", (f"{hf}q_proj.weight",))
    assert [name for _, name, _ in moonlight[1:]] == ["linear_kv_down_proj.weight", "kv_layernorm.weight", "linear_kv_up_proj.weight", "linear_proj.weight"]


def test_te_names_of_the_fused_latent_norms_are_translated():
    assert canonical_name("decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight") == "decoder.layers.0.self_attention.q_layernorm.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight") == "decoder.layers.0.self_attention.kv_layernorm.weight"


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096}}, "rope type = 'yarn'"),
        ({"rope_interleave": False}, "rope_interleave = False"),
        ({"attention_bias": True}, "attention_bias = True"),
    ],
    ids=["yarn", "not-interleaved", "attention-bias"],
)
def test_what_megarl_does_not_compute_exactly_is_refused(options, expected):
    with pytest.raises(UnsupportedModel, match=expected):
        checked_family(deepseek_v3(**options))


def test_mtp_tensors_are_accepted_and_not_read(tmp_path):
    config = deepseek_v3()
    family = checked_family(config)
    names = {name.format(expert=expert) for rule in family.weight_rules(config) for name in rule.hf for expert in range(8)}
    mtp = {"model.layers.3.eh_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.mlp.experts.0.up_proj.weight"}
    assert not any(name.startswith("model.layers.3.") for name in names)
    save_file({name: torch.zeros(1) for name in names | mtp}, tmp_path / "model.safetensors")
    HFCheckpoint(tmp_path).check_names(config)
    with pytest.raises(CheckpointError, match="would not use"):
        HFCheckpoint(tmp_path).check_names(deepseek_v3(num_nextn_predict_layers=0))


MOONLIGHT_16B_A3B = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 2048, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "vocab_size": 163840,
    "max_position_embeddings": 8192,
}


def facts(tmp_path, **changes) -> ModelFacts:
    (tmp_path / "config.json").write_text(json.dumps({**MOONLIGHT_16B_A3B, **changes}))
    return ModelFacts.from_hf_dir(tmp_path)


def test_layouts_split_the_latent_projections_and_refuse_context_parallelism(tmp_path):
    assert facts(tmp_path).latent_widths == (576,)
    assert facts(tmp_path, q_lora_rank=1536).latent_widths == (1536, 576)
    assert layout_errors(ParallelConfig(tensor=8, sequence_parallel=True, expert=8, expert_tensor=1), 8, facts(tmp_path)) == []
    (problem,) = layout_errors(ParallelConfig(tensor=2, sequence_parallel=True), 2, facts(tmp_path, kv_lora_rank=511))
    assert problem.startswith("`parallel.tensor` (2) must divide the widths of the model's multi-latent attention down projections")
    (problem,) = layout_errors(ParallelConfig(context=2), 2, facts(tmp_path))
    assert problem == "`parallel.context` (2) > 1 is not available for multi-latent attention models (DeepSeek-V3) in megarl: set parallel.context=1"
