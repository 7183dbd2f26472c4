"""Megatron layer specs: Transformer Engine's when TE is usable, portable torch specs otherwise.

The portable spec keeps Megatron's own attention, MLP, MoE and parallel linear layers and swaps in
:class:`~megarl.models.portable.PortableNorm` and
:class:`~megarl.models.portable.PortableAttention`, which add the sequence- and context-parallel
support that Megatron's torch fallbacks lack. Multi-latent attention (DeepSeek-V3) is Megatron's
``MLASelfAttention`` in both backends (:func:`portable_mla_spec`, :func:`te_mla_spec`).
"""

from __future__ import annotations

import functools
from typing import Literal

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_with_transformer_engine_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megarl.config import ConfigError
from megarl.models.portable import PortableAttention, PortableNorm

Backend = Literal["te", "torch"]


def choose_backend(requested: str, has_transformer_engine: bool, *, packed_fp32: bool = False) -> Backend:
    """The layer implementation for ``model.attention_backend``: ``te``, ``torch``, or ``auto``
    (Transformer Engine when it imports, else the portable torch specs).

    Transformer Engine attends packed (THD) sequences with its flash and fused kernels only, which
    take fp16/bf16 (its unfused attention refuses THD): ``packed_fp32`` (``train.packing`` with
    ``model.dtype`` fp32) makes ``auto`` choose the portable specs.

    Raises:
        ConfigError: ``te`` where Transformer Engine does not import, or with ``packed_fp32``
            (bad input: exit code 2).
    """
    if requested == "auto":
        return "te" if has_transformer_engine and not packed_fp32 else "torch"
    if requested == "te" and packed_fp32:
        raise ConfigError(
            "model.attention_backend = 'te' with train.packing and model.dtype = fp32: Transformer Engine attends packed "
            "sequences in bf16/fp16 only; set model.dtype=bf16, model.attention_backend=torch, or train.packing=false"
        )
    if requested == "te" and not has_transformer_engine:
        raise ConfigError(
            "model.attention_backend = 'te' but Transformer Engine does not import here; install "
            "it (pip install -e '.[gpu]' on a CUDA machine) or set model.attention_backend=auto"
        )
    if requested not in ("te", "torch"):
        raise ConfigError(f"model.attention_backend = {requested!r}: expected 'auto', 'te' or 'torch'")
    return requested


@functools.cache
def with_bias(linear: type) -> type:
    """``linear`` built with a bias whatever ``add_bias_linear`` says: the attention output
    projection of HF models with ``attention_bias`` (Llama, Qwen3), whose MLP has no bias, while
    Megatron's one flag would give both one."""

    class LinearWithBias(linear):
        def __init__(self, *args, bias: bool, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    LinearWithBias.__name__ = LinearWithBias.__qualname__ = f"{linear.__name__}WithBias"
    return LinearWithBias


def portable_attention_spec(qk_layernorm: bool, attention_output_bias: bool = False) -> ModuleSpec:
    """Megatron's self-attention (fused q/k/v projection) with the portable core attention.

    Args:
        qk_layernorm: normalise queries and keys per head (Qwen3).
        attention_output_bias: the attention output projection has a bias (:func:`with_bias`).
    """
    qk_norm = PortableNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=PortableAttention,
            linear_proj=with_bias(RowParallelLinear) if attention_output_bias else RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def portable_mla_spec() -> ModuleSpec:
    """Megatron's multi-latent attention (DeepSeek-V3) with the portable norms and core attention.

    Every projection is tensor-parallel, the down projections too (Megatron gathers their
    output), so one set of mapping rules serves this spec and the TE one (:func:`te_mla_spec`).
    """
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=PortableAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=PortableNorm,
            kv_layernorm=PortableNorm,
        ),
    )


def portable_layer_spec(num_experts: int | None, moe_grouped_gemm: bool, self_attention: ModuleSpec) -> ModuleSpec:
    """A transformer layer built from Megatron's modules plus the portable norm and attention.

    Args:
        num_experts: experts of this layer's MoE block; None for a dense MLP.
        moe_grouped_gemm: grouped expert weights (``GroupedMLP``) instead of one module per expert.
        self_attention: :func:`portable_attention_spec` or :func:`portable_mla_spec`.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=PortableNorm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=PortableNorm,
            mlp=get_mlp_module_spec_for_backend(
                backend=LocalSpecProvider(),
                num_experts=num_experts,
                moe_grouped_gemm=moe_grouped_gemm,
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_mla_spec(num_experts: int | None, moe_grouped_gemm: bool) -> ModuleSpec:
    """Megatron's Transformer Engine layer with multi-latent attention, its q/kv norms fused into
    the up projections (``linear_q_up_proj.layer_norm_weight``), and column-parallel down
    projections (TE's default keeps them whole on every rank) so that the mapping rules are those
    of :func:`portable_mla_spec`."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

    spec = get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True, multi_latent_attention=True
    )
    attention = spec.submodules.self_attention.submodules
    attention.linear_q_down_proj = TEColumnParallelLinear
    attention.linear_kv_down_proj = TEColumnParallelLinear
    return spec


def layer_spec(config: TransformerConfig, is_moe: bool, backend: Backend, attention_output_bias: bool = False) -> ModuleSpec:
    """The spec of one decoder layer (dense or MoE; multi-latent attention when
    ``config.multi_latent_attention``) for ``backend``."""
    num_experts = config.num_moe_experts if is_moe else None
    if config.multi_latent_attention:
        if backend == "te":
            return te_mla_spec(num_experts, config.moe_grouped_gemm)
        return portable_layer_spec(num_experts, config.moe_grouped_gemm, portable_mla_spec())
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )
        if attention_output_bias:
            attention = spec.submodules.self_attention.submodules
            attention.linear_proj = with_bias(attention.linear_proj)
        return spec
    return portable_layer_spec(
        num_experts, config.moe_grouped_gemm, portable_attention_spec(config.qk_layernorm, attention_output_bias)
    )


def decoder_block_spec(
    config: TransformerConfig,
    moe_layers: list[bool],
    backend: Backend,
    vp_stage: int | None = None,
    attention_output_bias: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds, plus the final norm.

    Args:
        config: the model's TransformerConfig (its parallel sizes decide the stage's layers).
        moe_layers: for every global layer, whether it is an MoE layer.
        backend: ``"te"`` (Transformer Engine) or ``"torch"`` (portable).
        vp_stage: the virtual pipeline stage of the chunk being built, None without VPP.
        attention_output_bias: the attention output projection has a bias.
    """
    if len(moe_layers) != config.num_layers:
        raise ValueError(
            f"moe_layers lists {len(moe_layers)} layers but the model has {config.num_layers}"
        )
    specs = [layer_spec(config, is_moe, backend, attention_output_bias) for is_moe in moe_layers]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = PortableNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm)
