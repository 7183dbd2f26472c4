"""Build Megatron ``GPTModel`` chunks for a HuggingFace model under a parallel layout."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megarl.models.families import checked_family
from megarl.models.family import partial_rotary_factor, rope_theta, rotary_inv_freq
from megarl.models.specs import Backend, decoder_block_spec
from megarl.config import DTYPE_NAMES, ParallelConfig
from megarl.platform import current_device

DTYPES = {key: getattr(torch, name) for key, name in DTYPE_NAMES.items()}
"""The dtypes a config or a tool names (``model.dtype``, ``--dtype``), as torch dtypes."""

VOCAB_DIVISIBLE_BY = 128
"""Megatron pads the vocabulary so every TP shard has the same size; rounding to a multiple of
lcm(128, TP) keeps the padded size the same for every TP that divides 128, so a checkpoint and the
padded logits do not depend on the layout."""


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """The vocabulary size Megatron allocates: ``vocab_size`` rounded up to lcm(128, TP)."""
    multiple = math.lcm(VOCAB_DIVISIBLE_BY, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything needed to build the Megatron model of a HF model under a layout."""

    hf_config: Any
    """The HuggingFace config (``transformers.PretrainedConfig``)."""
    transformer_config: TransformerConfig
    """Megatron's config, with the layout's parallel sizes."""
    moe_layers: list[bool]
    """For each global layer, whether it is MoE."""
    padded_vocab_size: int
    """Vocabulary rows Megatron allocates (``>= hf_config.vocab_size``)."""
    attention_output_bias: bool = False
    """The attention output projection has a bias (Megatron's config has no field for it alone)."""


def model_spec(
    hf_config,
    layout: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> ModelSpec:
    """Translate a HF config and a layout into Megatron's TransformerConfig.

    Args:
        hf_config: the HuggingFace config.
        layout: the parallel layout.
        dtype: parameter and compute dtype (float32, bfloat16 or float16).
        **overrides: further TransformerConfig fields (recompute, MoE dispatcher, ...).

    Raises:
        UnsupportedModel: the architecture, or one of its options, is not implemented.
    """
    family = checked_family(hf_config)
    on_cpu = not torch.cuda.is_available()
    fields = {
        **family.config_fields(hf_config),
        # Parallel layout.
        "tensor_model_parallel_size": layout.tensor,
        "pipeline_model_parallel_size": layout.pipeline,
        "virtual_pipeline_model_parallel_size": layout.virtual_pipeline,
        "context_parallel_size": layout.context,
        "expert_model_parallel_size": layout.expert,
        "expert_tensor_parallel_size": layout.expert_tensor_size,
        "sequence_parallel": layout.sequence_parallel,
        # Precision.
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        # RL fine-tunes a pretrained policy: no dropout, so the trainer's log-probs equal the
        # rollout engine's.
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # Losses are sums over tokens divided by the global token count (RL loss aggregation).
        "calculate_per_token_loss": True,
        # Rollouts have varying lengths, so pipeline stages exchange shapes each micro-batch.
        "variable_seq_lengths": True,
        # Fused CUDA kernels from apex/TE are not assumed; the plain paths are exact.
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "moe_token_dispatcher_type": "alltoall",
        "use_cpu_initialization": on_cpu,
        # gloo pairs point-to-point messages by peer and posting order, so the batched send/recv
        # of the interleaved schedule (both directions to the same peer) mixes messages up there.
        "batch_p2p_comm": not on_cpu,
    }
    fields.update(overrides)
    config_class = MLATransformerConfig if fields.get("multi_latent_attention") else TransformerConfig
    return ModelSpec(
        hf_config=hf_config,
        transformer_config=config_class(**fields),
        moe_layers=family.moe_layers(hf_config),
        padded_vocab_size=padded_vocab_size(hf_config.vocab_size, layout.tensor),
        attention_output_bias=family.attention_output_bias(hf_config),
    )


def build_model(
    spec: ModelSpec,
    backend: Backend,
    pg_collection: ProcessGroupCollection,
) -> list[GPTModel]:
    """Build this rank's model chunks (one per virtual pipeline stage) on the current device.

    Args:
        spec: from :func:`model_spec`.
        backend: ``"te"`` or ``"torch"`` layer specs.
        pg_collection: the process groups from :func:`megarl.parallel.initialize`.

    Returns:
        The chunks, in virtual-stage order (a single chunk without VPP).
    """
    config = spec.transformer_config
    hf_config = spec.hf_config
    vp_size = config.virtual_pipeline_model_parallel_size
    pp_rank = pg_collection.pp.rank()
    pp_size = pg_collection.pp.size()
    device = current_device()
    # transformers' frequencies (rope scaling included) replace those Megatron derives from the base.
    inv_freq = rotary_inv_freq(hf_config)
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(
                config, spec.moe_layers, backend, vp_stage=stage, attention_output_bias=spec.attention_output_bias
            ),
            vocab_size=spec.padded_vocab_size,
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=pp_rank == 0 and is_vp_first_stage(vp_stage, vp_size),
            post_process=pp_rank == pp_size - 1 and is_vp_last_stage(vp_stage, vp_size),
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=rope_theta(hf_config),
            rotary_percent=partial_rotary_factor(hf_config),
            pg_collection=pg_collection,
            vp_stage=stage,
        )
        if config.multi_latent_attention:
            # Each multi-latent attention layer has its own rotary embedding (of the rotary part
            # of its heads), GPTModel none.
            for layer in chunk.decoder.layers:
                layer.self_attention.rotary_pos_emb.inv_freq.copy_(inv_freq)
        else:
            chunk.rotary_pos_emb.inv_freq.copy_(inv_freq)
        chunks.append(chunk.to(device))
    return chunks


