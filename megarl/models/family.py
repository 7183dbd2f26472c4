"""Model families: how a HuggingFace architecture becomes a Megatron model.

A family is data plus small functions: which HF ``architectures`` it serves, how its HF config maps
to Megatron's ``TransformerConfig`` fields, which layers are MoE, and the weight mapping rules
(:mod:`megarl.models.mapping`). The families megarl serves are one table,
:data:`megarl.models.families.FAMILIES`, where :func:`~megarl.models.families.family_of` finds the
one for a HF config.

A family also declares the HF config options that change the computation and the values it
implements (:class:`Option`): :func:`~megarl.models.families.checked_family` refuses any other
value, naming it, so that a model is converted exactly or not at all.

Llama-style decoders share :func:`decoder_fields`, :func:`decoder_weight_rules` and
:data:`DECODER_OPTIONS` (``llama.py``: Llama, Qwen2; ``qwen3.py``: Qwen3, Qwen3-MoE;
``qwen2_moe.py``; ``glm4_moe.py``: GLM-4.5, with the MoE block of ``deepseek_moe.py``: sigmoid
router with expert bias, group-limited routing, the first dense layers). DeepSeek-V3
(``deepseek_v3.py``) keeps their fields, embedding rules (:func:`embedding_rules`) and MLP rules,
with multi-latent attention in place of the fused q/k/v projection and the same MoE block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn.functional as F

from megarl.models.mapping import (
    FusedGateUp,
    FusedQKV,
    Replicated,
    RowParallel,
    Rule,
    VocabParallel,
)


class UnsupportedModel(ValueError):
    """A HF model megarl cannot build exactly: an architecture no family serves, or a config
    option at a value the family does not implement. The message names the option and the value."""


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """A HF config option that changes the model's computation, and the values a family
    implements; any other value is refused (:func:`checked_family`) rather than converted wrong."""

    key: str
    """The HF config key."""
    supported: tuple[Any, ...]
    """The values megarl implements."""
    default: Any = None
    """The value when the config lacks the key (transformers' default)."""
    read: Callable[[Any], Any] | None = None
    """Reads the value from the HF config where it is not a plain attribute."""

    def problem(self, hf_config, family: str) -> str | None:
        value = self.read(hf_config) if self.read else getattr(hf_config, self.key, self.default)
        if value in self.supported:
            return None
        return (
            f"{self.key} = {value!r} is not supported by megarl's {family} family (it implements "
            f"{' or '.join(repr(option) for option in self.supported)})"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFamily:
    """How one HF architecture maps onto Megatron."""

    name: str
    """Short name, e.g. ``qwen3_moe``."""
    architectures: tuple[str, ...]
    """HF ``config.architectures`` entries this family serves."""
    config_fields: Callable[[Any], dict[str, Any]]
    """HF config -> the architecture's ``TransformerConfig`` keyword arguments."""
    moe_layers: Callable[[Any], list[bool]]
    """HF config -> for each layer, whether it is an MoE layer."""
    weight_rules: Callable[[Any], list[Rule]]
    """HF config -> the weight mapping rules (per-layer rules with the layer filled in, expert
    rules templated on ``{expert}``)."""
    options: tuple[Option, ...] = ()
    """The HF config options that change the computation, with the values implemented."""
    attention_output_bias: Callable[[Any], bool] = lambda hf_config: False
    """HF config -> whether the attention output projection (``o_proj``) has a bias while the MLP
    has none (Megatron's ``add_bias_linear`` would give both one)."""
    ignored_hf_tensors: Callable[[Any], tuple[str, ...]] = lambda hf_config: ()
    """HF config -> name prefixes of checkpoint tensors that megarl loads past without building
    them (multi-token-prediction layers): the loader accepts them, the exporter and the weight
    stream never produce them."""


def rope_parameters(hf_config) -> dict[str, Any]:
    """The rotary embedding's parameters: ``rope_parameters`` (transformers 5), else the
    ``rope_scaling`` dict and ``rope_theta`` of older configs."""
    parameters = getattr(hf_config, "rope_parameters", None)
    if parameters:
        return dict(parameters)
    parameters = dict(getattr(hf_config, "rope_scaling", None) or {})
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    if getattr(hf_config, "rope_theta", None) is not None:
        parameters["rope_theta"] = hf_config.rope_theta
    return parameters


def rope_theta(hf_config) -> float:
    """The rotary base."""
    theta = rope_parameters(hf_config).get("rope_theta")
    if theta is None:
        raise UnsupportedModel("the HF config has neither rope_theta nor rope_parameters['rope_theta']")
    return float(theta)


def rotary_inv_freq(hf_config):
    """``[rotary_dim / 2]`` rotary frequencies exactly as transformers computes them for this config
    (the default, ``linear`` or ``llama3`` scaling); Megatron's rotary embedding then uses them.
    ``rotary_dim`` is ``int(head_dim * partial_rotary_factor)``, as in transformers and in
    Megatron's ``rotary_percent``.

    Scaled types come from transformers' own ``ROPE_INIT_FUNCTIONS``; the default is the one line
    of the models' ``compute_default_rope_parameters`` (``LlamaRotaryEmbedding``'s), written out
    because importing a modeling file imports TorchDynamo (0.7 s of the trainer's start-up);
    ``tests/models/test_family.py`` checks it against ``LlamaRotaryEmbedding``."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = _rope_type(hf_config)
    if rope_type == "default":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(head_dim * partial_rotary_factor(hf_config))
        inv_freq, attention_scaling = 1.0 / (rope_theta(hf_config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    if attention_scaling != 1.0:
        raise UnsupportedModel(
            f"rope type {rope_type!r} scales attention by {attention_scaling}; megarl implements rope "
            "types without attention scaling"
        )
    return inv_freq.float()


def _rope_type(hf_config) -> str:
    return rope_parameters(hf_config).get("rope_type", "default")


def partial_rotary_factor(hf_config) -> float:
    """The fraction of each head's dimensions that rotary embedding rotates (the first ones;
    Megatron's ``rotary_percent``): ``partial_rotary_factor`` of ``rope_parameters`` or of the
    config, 1 when neither has it."""
    return float(rope_parameters(hf_config).get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))


def _attention_layer_types(hf_config) -> str:
    """``full_attention`` when every layer attends to the whole sequence, else what differs:
    transformers 5 lists each layer's type (``layer_types``), older configs say
    ``use_sliding_window``."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return ", ".join(sorted(set(layer_types) - {"full_attention"})) or "full_attention"
    if getattr(hf_config, "use_sliding_window", False):
        return f"sliding window of {getattr(hf_config, 'sliding_window', None)}"
    return "full_attention"


DECODER_OPTIONS = (
    Option("hidden_act", ("silu",), default="silu"),
    Option("mlp_bias", (False,), default=False),
    # Rope types that only change the frequencies: transformers' own are copied into Megatron.
    Option("rope type", ("default", "linear", "llama3"), read=_rope_type),
    Option("partial_rotary_factor", (1.0,), read=partial_rotary_factor),
    Option("attention layer types", ("full_attention",), read=_attention_layer_types),
)
"""Options every Llama-style decoder family declares; each family adds its own."""


def decoder_fields(hf_config, *, qkv_bias: bool) -> dict[str, Any]:
    """``TransformerConfig`` fields shared by Llama-style decoders (pre-norm RMSNorm, SwiGLU,
    rotary embedding, grouped-query attention).

    Args:
        hf_config: the HF config (its options checked: :data:`DECODER_OPTIONS`).
        qkv_bias: the q/k/v projections have biases (Qwen2, or ``attention_bias``); the MLP never
            does, and ``o_proj``'s bias is the family's ``attention_output_bias``.
    """
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
    )


def dense_layers(hf_config) -> list[bool]:
    """No MoE layer."""
    return [False] * hf_config.num_hidden_layers


def qwen_moe_layers(hf_config) -> list[bool]:
    """Qwen MoE layer pattern: layer i is sparse unless listed in ``mlp_only_layers``, and only
    every ``decoder_sparse_step``-th layer is (``(i + 1) % step == 0``)."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)]


def qwen_moe_fields(hf_config) -> dict[str, Any]:
    """``TransformerConfig`` MoE fields of Qwen2-MoE and Qwen3-MoE routing (softmax, top-k)."""
    return {
        # transformers 5 names it num_local_experts, 4 named it num_experts.
        "num_moe_experts": getattr(hf_config, "num_local_experts", None) or hf_config.num_experts,
        "moe_router_topk": hf_config.num_experts_per_tok,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        # HF takes the softmax over all experts, then the top k. That equals Megatron's default
        # (top k, then softmax over the k chosen) when HF renormalises the top-k weights;
        # without renormalisation Megatron must take the softmax first.
        "moe_router_pre_softmax": not hf_config.norm_topk_prob,
        "moe_router_score_function": "softmax",
        # HF computes the routing softmax in float32.
        "moe_router_dtype": "fp32",
        "moe_layer_freq": [int(is_moe) for is_moe in qwen_moe_layers(hf_config)],
    }


def embedding_rules(hf_config) -> list[Rule]:
    """Mapping rules outside the decoder layers: the embedding, the final norm, the output layer."""
    vocab = hf_config.vocab_size
    return [
        VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab_size=vocab),
        Replicated("decoder.final_layernorm.weight", ("model.norm.weight",)),
        # With tied embeddings the last pipeline stage still holds its own copy of the embedding as
        # the output layer; it loads from (and exports to) the same HF tensor.
        VocabParallel(
            "output_layer.weight",
            ("model.embed_tokens.weight" if hf_config.tie_word_embeddings else "lm_head.weight",),
            vocab_size=vocab,
        ),
    ]


def decoder_weight_rules(
    hf_config,
    moe_layers: list[bool],
    *,
    qkv_bias: bool,
    proj_bias: bool = False,
    qk_norm: bool = False,
    shared_expert: bool = False,
    moe_block_rules: Callable[[str, str], list[Rule]] | None = None,
) -> list[Rule]:
    """Mapping rules of a Llama-style decoder (Llama, Qwen2, Qwen3 and their MoE variants).

    Megatron names are those of megarl's portable layer spec; Transformer Engine's fused names
    are translated to them by :func:`megarl.models.loader.canonical_name`.

    Args:
        hf_config: the HF config.
        moe_layers: whether each layer is MoE.
        qkv_bias: the q/k/v projections have biases (Qwen2).
        proj_bias: the attention output projection has a bias (``attention_bias`` of Llama, Qwen3).
        qk_norm: per-head q/k RMSNorm (Qwen3).
        shared_expert: a shared expert with a sigmoid gate beside the routed experts (Qwen2-MoE).
        moe_block_rules: the rules of an MoE layer's MLP from the Megatron and HF layer prefixes
            (``decoder.layers.3.``, ``model.layers.3.``); None: Qwen's (:func:`qwen_moe_rules`).
    """
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    qkv = dict(num_query_groups=groups, heads_per_group=heads // groups, head_dim=head_dim)
    rules = embedding_rules(hf_config)
    for layer, is_moe in enumerate(moe_layers):
        mg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attention = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        rules += [
            Replicated(f"{mg}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
            FusedQKV(f"{mg}self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in attention), **qkv),
            RowParallel(f"{mg}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
            Replicated(f"{mg}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        ]
        if qkv_bias:
            rules.append(
                FusedQKV(f"{mg}self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in attention), **qkv)
            )
        if proj_bias:
            rules.append(Replicated(f"{mg}self_attention.linear_proj.bias", (f"{hf}self_attn.o_proj.bias",)))
        if qk_norm:
            rules += [
                Replicated(f"{mg}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
                Replicated(f"{mg}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",)),
            ]
        if not is_moe:
            rules += swiglu_mlp_rules(f"{mg}mlp.", f"{hf}mlp.")
        elif moe_block_rules is not None:
            rules += moe_block_rules(mg, hf)
        else:
            rules += qwen_moe_rules(mg, hf, shared_expert=shared_expert)
    return rules


def swiglu_mlp_rules(mg_mlp: str, hf_mlp: str) -> list[Rule]:
    """A SwiGLU MLP: HF's ``gate_proj`` and ``up_proj`` fused into Megatron's ``linear_fc1``,
    ``down_proj`` as ``linear_fc2``.

    Args:
        mg_mlp: the Megatron module prefix (``decoder.layers.0.mlp.``, an expert's
            ``decoder.layers.1.mlp.experts.local_experts.{expert}.``, ``...mlp.shared_experts.``).
        hf_mlp: the HF module prefix (``model.layers.0.mlp.``, ``model.layers.1.mlp.experts.{expert}.``).
    """
    return [
        FusedGateUp(f"{mg_mlp}linear_fc1.weight", (f"{hf_mlp}gate_proj.weight", f"{hf_mlp}up_proj.weight")),
        RowParallel(f"{mg_mlp}linear_fc2.weight", (f"{hf_mlp}down_proj.weight",)),
    ]


def routed_expert_rules(mg_layer: str, hf_layer: str) -> list[Rule]:
    """The router weight (HF ``mlp.gate``) and the routed experts of one MoE layer, templated on
    ``{expert}``; ``mg_layer`` / ``hf_layer`` are the layer prefixes (``decoder.layers.1.``,
    ``model.layers.1.``)."""
    return [
        Replicated(f"{mg_layer}mlp.router.weight", (f"{hf_layer}mlp.gate.weight",)),
        *swiglu_mlp_rules(f"{mg_layer}mlp.experts.local_experts.{{expert}}.", f"{hf_layer}mlp.experts.{{expert}}."),
    ]


def qwen_moe_rules(mg_layer: str, hf_layer: str, *, shared_expert: bool) -> list[Rule]:
    """A Qwen MoE layer's MLP: router and routed experts, and with ``shared_expert`` Qwen2-MoE's
    shared expert and its sigmoid gate (``shared_expert_gate``)."""
    rules = routed_expert_rules(mg_layer, hf_layer)
    if shared_expert:
        rules += [
            *swiglu_mlp_rules(f"{mg_layer}mlp.shared_experts.", f"{hf_layer}mlp.shared_expert."),
            Replicated(f"{mg_layer}mlp.shared_experts.gate_weight", (f"{hf_layer}mlp.shared_expert_gate.weight",)),
        ]
    return rules
