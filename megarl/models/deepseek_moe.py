"""The MoE block of DeepSeek-V3 and GLM-4.5 on Megatron (transformers' ``DeepseekV3MoE`` and
``Glm4MoeMoE``, routed by ``*TopkRouter``).

transformers computes, for a token ``x`` of an MoE layer (``E`` routed experts, ``k`` chosen)::

    scores  = sigmoid(W_gate x)                       fp32, [E]
    choice  = scores + e_score_correction_bias        the bias steers the choice only
    groups  : E experts in n_group groups; keep the topk_group groups whose two best `choice` sum highest
    top     = the k experts of the kept groups with the highest `choice`
    weights = scores[top] / sum(scores[top])          (norm_topk_prob)
              * routed_scaling_factor
    out     = sum_j weights_j expert_top_j(x) + shared(x)

where ``shared`` is one SwiGLU MLP of ``n_shared_experts * moe_intermediate_size`` added without a
gate. Layers ``0 .. first_k_dense_replace - 1`` have a dense MLP (``intermediate_size``), all later
ones this block.

Megatron's ``TopKRouter`` computes the same with ``moe_router_score_function="sigmoid"``, the
expert bias (``moe_router_enable_expert_bias``), ``moe_router_num_groups`` /
``moe_router_group_topk``, ``moe_router_topk_scaling_factor`` and the routing in fp32, except
where :data:`DEEPSEEK_MOE_OPTIONS` refuses a config:

- Megatron scores a group by the sum of its best ``k / topk_group`` experts, transformers by its
  best two: group-limited routing is exact when ``k / topk_group`` is 2 (DeepSeek-V3: 8 / 4).
  Without a group limit (``topk_group == n_group``, GLM-4.5's one group) no group is dropped and
  megarl leaves Megatron's group fields unset.
- Megatron's sigmoid top-k renormalises the weights whenever ``k > 1`` and never for ``k = 1``;
  the configs it matches are ``norm_topk_prob`` true with ``k > 1``.

The expert bias lives in Megatron's router as the buffer ``expert_bias``, a weight of the model
for the loader, the exporter and the weight stream (:func:`megarl.models.loader.model_weights`).
Megatron's aux-loss-free balancing moves it after every optimizer step by
``moe_router_bias_update_rate * sign(mean load - expert load)`` (``finalize_model_grads``); megarl
sets the rate to 0, which adds exactly nothing, so the policy routes with the checkpoint's bias
unless ``model.moe_router_bias_update_rate`` asks for the update (the changed bias then streams
to the engines with the other weights).

Both families keep their multi-token-prediction layers at ``model.layers.{num_hidden_layers + i}``
in real checkpoints; :func:`mtp_layer_prefixes` names them for a family's ``ignored_hf_tensors``.
"""

from __future__ import annotations

from typing import Any

from megarl.models.family import Option, routed_expert_rules, swiglu_mlp_rules
from megarl.models.mapping import Replicated, Rule

HF_GROUP_SCORE_EXPERTS = 2
"""transformers scores an expert group by the sum of its best two ``choice`` values."""


def deepseek_moe_layers(hf_config) -> list[bool]:
    """Layer ``i`` is MoE when ``i >= first_k_dense_replace`` (transformers' decoder layers)."""
    first_moe = getattr(hf_config, "first_k_dense_replace", None) or 0
    return [layer >= first_moe for layer in range(hf_config.num_hidden_layers)]


def _group_limited(hf_config) -> bool:
    """Whether the router drops expert groups (keeps fewer than all ``n_group``)."""
    groups = getattr(hf_config, "n_group", None) or 1
    return (getattr(hf_config, "topk_group", None) or groups) < groups


def shared_expert_size(hf_config) -> int:
    """The shared MLP's intermediate size, ``n_shared_experts * moe_intermediate_size`` (0: none)."""
    return (getattr(hf_config, "n_shared_experts", None) or 0) * hf_config.moe_intermediate_size


def deepseek_moe_fields(hf_config) -> dict[str, Any]:
    """``TransformerConfig`` fields of the MoE block and of the dense-then-MoE layer pattern.

    The dense layers' MLP size (``ffn_hidden_size = intermediate_size``) comes from the decoder's
    own fields."""
    fields: dict[str, Any] = {
        "num_moe_experts": hf_config.n_routed_experts,
        "moe_router_topk": hf_config.num_experts_per_tok,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        "moe_layer_freq": [int(is_moe) for is_moe in deepseek_moe_layers(hf_config)],
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        # Frozen unless model.moe_router_bias_update_rate asks for the update (module docstring).
        "moe_router_bias_update_rate": 0.0,
        "moe_router_topk_scaling_factor": float(getattr(hf_config, "routed_scaling_factor", 1.0)),
        # transformers routes in float32 (router weight, logits, sigmoid, weights).
        "moe_router_dtype": "fp32",
        "moe_shared_expert_intermediate_size": shared_expert_size(hf_config) or None,
        "moe_shared_expert_gate": False,
    }
    if _group_limited(hf_config):
        fields.update(moe_router_num_groups=hf_config.n_group, moe_router_group_topk=hf_config.topk_group)
    return fields


def deepseek_moe_rules(hf_config, mg_prefix: str, hf_prefix: str) -> list[Rule]:
    """Mapping rules of one MoE layer's MLP: router weight, expert bias, routed experts (templated
    on ``{expert}``) and shared experts.

    Args:
        hf_config: the HF config (whether there are shared experts).
        mg_prefix: the Megatron layer prefix, ``decoder.layers.{layer}.``.
        hf_prefix: the HF layer prefix, ``model.layers.{layer}.``.
    """
    rules = [
        *routed_expert_rules(mg_prefix, hf_prefix),
        Replicated(f"{mg_prefix}mlp.router.expert_bias", (f"{hf_prefix}mlp.gate.e_score_correction_bias",)),
    ]
    if shared_expert_size(hf_config):
        rules += swiglu_mlp_rules(f"{mg_prefix}mlp.shared_experts.", f"{hf_prefix}mlp.shared_experts.")
    return rules


def mtp_layer_prefixes(hf_config) -> tuple[str, ...]:
    """The HF name prefixes of the multi-token-prediction layers, ``model.layers.{num_hidden_layers
    + i}.`` for each of ``num_nextn_predict_layers``."""
    layers, extra = hf_config.num_hidden_layers, getattr(hf_config, "num_nextn_predict_layers", None) or 0
    return tuple(f"model.layers.{layers + index}." for index in range(extra))


def _group_score_experts(hf_config) -> int | str:
    """The experts Megatron sums to score a group, ``num_experts_per_tok // topk_group``, where
    groups are dropped."""
    if not _group_limited(hf_config):
        return "no group limit"
    return hf_config.num_experts_per_tok // hf_config.topk_group


DEEPSEEK_MOE_OPTIONS = (
    Option("norm_topk_prob", (True,), default=True),
    Option("num_experts_per_tok > 1", (True,), read=lambda hf_config: hf_config.num_experts_per_tok > 1),
    Option(
        "num_experts_per_tok // topk_group (experts per group score, with topk_group < n_group)",
        (HF_GROUP_SCORE_EXPERTS, "no group limit"),
        read=_group_score_experts,
    ),
)
"""The options of the MoE block and the values Megatron computes exactly (module docstring); a
family using the block adds them to its own (``hidden_act`` is the decoder's option)."""
