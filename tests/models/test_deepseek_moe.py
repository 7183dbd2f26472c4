"""The DeepSeek-V3 / GLM-4.5 MoE block: its Megatron fields route exactly as transformers' router,
its rules cover router, expert bias, routed and shared experts, and the configs Megatron cannot
compute are refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

from megarl.models.deepseek_moe import (
    DEEPSEEK_MOE_OPTIONS,
    deepseek_moe_fields,
    deepseek_moe_layers,
    deepseek_moe_rules,
    mtp_layer_prefixes,
)

pytestmark = pytest.mark.cpu


def deepseek_v3(**options):
    """A tiny DeepSeek-V3 config: 8 experts in 4 groups, 2 groups kept, top 4 (4 / 2 = 2 experts
    per group score, as DeepSeek-V3's 8 / 4)."""
    values = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    return transformers.DeepseekV3Config(**{**values, **options})


def glm4_moe(**options):
    values = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=2, num_nextn_predict_layers=1,
    )
    return transformers.Glm4MoeConfig(**{**values, **options})


def test_layers_from_first_k_dense_replace_are_moe():
    assert deepseek_moe_layers(deepseek_v3()) == [False, True, True, True]
    assert deepseek_moe_layers(glm4_moe()) == [False, False, True]
    assert deepseek_moe_layers(deepseek_v3(first_k_dense_replace=0)) == [True] * 4


def test_fields_of_a_group_limited_router_with_shared_experts():
    fields = deepseek_moe_fields(deepseek_v3())
    assert fields == {
        "num_moe_experts": 8,
        "moe_router_topk": 4,
        "moe_ffn_hidden_size": 16,
        "moe_layer_freq": [0, 1, 1, 1],
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_bias_update_rate": 0.0,
        "moe_router_topk_scaling_factor": 2.5,
        "moe_router_dtype": "fp32",
        "moe_shared_expert_intermediate_size": 32,
        "moe_shared_expert_gate": False,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 2,
    }


def test_without_a_group_limit_megatron_gets_no_groups():
    fields = deepseek_moe_fields(glm4_moe())
    assert "moe_router_num_groups" not in fields and "moe_router_group_topk" not in fields
    # All groups kept: no group is dropped either.
    assert "moe_router_group_topk" not in deepseek_moe_fields(deepseek_v3(topk_group=4))


def test_rules_of_one_moe_layer():
    rules = deepseek_moe_rules(deepseek_v3(), "decoder.layers.2.", "model.layers.2.")
    assert [(type(rule).__name__, rule.megatron, rule.hf) for rule in rules] == [
        ("Replicated", "decoder.layers.2.mlp.router.weight", ("model.layers.2.mlp.gate.weight",)),
        (
            "FusedGateUp", "decoder.layers.2.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            ("model.layers.2.mlp.experts.{expert}.gate_proj.weight", "model.layers.2.mlp.experts.{expert}.up_proj.weight"),
        ),
        ("RowParallel", "decoder.layers.2.mlp.experts.local_experts.{expert}.linear_fc2.weight", ("model.layers.2.mlp.experts.{expert}.down_proj.weight",)),
        ("Replicated", "decoder.layers.2.mlp.router.expert_bias", ("model.layers.2.mlp.gate.e_score_correction_bias",)),
        (
            "FusedGateUp", "decoder.layers.2.mlp.shared_experts.linear_fc1.weight",
            ("model.layers.2.mlp.shared_experts.gate_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight"),
        ),
        ("RowParallel", "decoder.layers.2.mlp.shared_experts.linear_fc2.weight", ("model.layers.2.mlp.shared_experts.down_proj.weight",)),
    ]
    assert [rule.is_expert for rule in rules] == [False, True, True, False, False, False]
    assert len(deepseek_moe_rules(deepseek_v3(n_shared_experts=0), "decoder.layers.2.", "model.layers.2.")) == 4


def test_mtp_layers_follow_the_decoder_layers():
    assert mtp_layer_prefixes(glm4_moe()) == ("model.layers.3.",)
    assert mtp_layer_prefixes(glm4_moe(num_nextn_predict_layers=0)) == ()
    assert mtp_layer_prefixes(deepseek_v3(num_nextn_predict_layers=2)) == ("model.layers.4.", "model.layers.5.")


def problems(config) -> list[str]:
    return [problem for option in DEEPSEEK_MOE_OPTIONS if (problem := option.problem(config, "test"))]


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"norm_topk_prob": False}, "norm_topk_prob = False is not supported by megarl's test family (it implements True)"),
        ({"num_experts_per_tok": 1, "topk_group": 4}, "num_experts_per_tok > 1 = False"),
        ({"num_experts_per_tok": 8}, "num_experts_per_tok // topk_group (experts per group score, with topk_group < n_group) = 4"),
    ],
    ids=["not-renormalised", "top-1", "group-score-of-4"],
)
def test_what_megatron_routes_otherwise_is_refused_by_name(options, expected):
    (problem,) = problems(deepseek_v3(**options))
    assert problem.startswith(expected)


def test_the_real_routers_are_accepted():
    assert problems(deepseek_v3()) == [] and problems(glm4_moe()) == []
    # GLM-4.5: 160 experts in one group, top 8.
    assert problems(glm4_moe(n_routed_experts=160, num_experts_per_tok=8)) == []


@pytest.mark.parametrize("config", [deepseek_v3(), deepseek_v3(topk_group=4), glm4_moe()], ids=["group-limited", "all-groups", "glm"])
def test_megatron_routing_with_these_fields_is_transformers_routing(config):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.3)
    tokens = torch.randn(64, config.hidden_size)
    _, hf_weights, hf_experts = router(tokens)
    fields = deepseek_moe_fields(config)
    probs, routing_map = topk_routing_with_score_function(
        tokens @ router.weight.T, fields["moe_router_topk"], num_groups=fields.get("moe_router_num_groups"),
        group_topk=fields.get("moe_router_group_topk"), scaling_factor=fields["moe_router_topk_scaling_factor"],
        score_function=fields["moe_router_score_function"], expert_bias=router.e_score_correction_bias,
    )
    expected_map = torch.zeros_like(routing_map).scatter(1, hf_experts, True)
    assert torch.equal(routing_map, expected_map)
    torch.testing.assert_close(probs.gather(1, hf_experts), hf_weights, rtol=1e-6, atol=1e-7)
