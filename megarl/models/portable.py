"""Portable layer pieces for Megatron specs when Transformer Engine is not installed.

Megatron's own torch fallbacks refuse sequence parallelism (``WrappedTorchNorm``) and context
parallelism (``DotProductAttention``). These two modules fill the gap with plain torch, so that
every parallel layout runs on any machine:

- :class:`PortableNorm`: RMSNorm / LayerNorm whose weights are marked ``sequence_parallel``, so
  Megatron all-reduces their gradients over the tensor-parallel group when SP shards the sequence.
- :class:`PortableAttention`: core attention through ``scaled_dot_product_attention`` with
  grouped-query heads, and context parallelism by all-gathering K/V over the CP group. Each CP rank
  holds two load-balanced chunks of the sequence (chunks ``r`` and ``2*CP-1-r`` of ``2*CP``), the
  layout Megatron's rotary embedding and data slicing already use.

Packed sequences (THD: samples concatenated without padding, bounds in ``PackedSeqParams``;
:mod:`megarl.models.thd`) are attended sample by sample, never across samples:
``scaled_dot_product_attention(is_causal=True)`` on the samples of each length group, padded to
the group's longest, in one call (without CP), or one call per sample (under CP). That is exact, has
a backward on every device, costs about the sum of the samples' squared lengths (not the pack's),
and takes GQA (``enable_gqa``) and multi-latent attention's unequal K/V widths as they are. The
alternatives lose on CPU: one call with a block-diagonal mask is quadratic in the pack (430 ms
against 33 ms forward+backward for a 4096-token pack of 23 samples, one thread), and
``flex_attention`` has no CPU backward (torch 2.13) and needs compiling. On a GPU Transformer
Engine's THD attention is the fast path. Under CP each sample is split into ``2*CP`` chunks and
rank ``r`` holds chunks ``r`` and ``2*CP-1-r`` of every sample (the layout Megatron's THD rotary
embedding assumes); K/V are all-gathered and placed at their pack positions, and each sample's
local queries attend to the sample's keys under a causal mask built from the chunk layout.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megarl.models.thd import context_parallel_order, gather_context_parallel, packed_layout, packed_positions


class PortableNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (``config.normalization``) that supports sequence parallelism.

    Normalises in float32 and returns the input dtype, as HuggingFace's Llama/Qwen norms do, so
    converted models match their reference logits in bf16 too.

    Args:
        config: the layer's TransformerConfig (``normalization``, ``sequence_parallel``,
            ``layernorm_zero_centered_gamma``).
        hidden_size: the normalised dimension.
        eps: added to the variance.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"PortableNorm supports normalization 'RMSNorm' or 'LayerNorm', got "
                f"{config.normalization!r}"
            )
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        initial = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(
            torch.full((hidden_size,), initial, dtype=config.params_dtype)
        )
        self.bias = (
            None
            if self.rms
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        # Under SP each TP rank normalises a different slice of the sequence, so the weight
        # gradients are partial sums that Megatron's finalize_model_grads all-reduces.
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.float()
        if self.rms:
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            hidden = F.layer_norm(hidden, hidden.shape[-1:], eps=self.eps)
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        hidden = weight * hidden.to(input_dtype)
        if self.bias is not None:
            hidden = hidden + self.bias
        return hidden


class PortableAttention(MegatronModule):
    """Core attention (softmax(QK^T)V) in plain torch, with GQA, context parallelism and packed
    sequences.

    Drop-in for Megatron's ``core_attention`` slot: same constructor and forward signature as
    ``DotProductAttention``. Inputs ``query: [sq, b, np, hk]``, ``key: [sk, b, ng, hk]``,
    ``value: [sk, b, ng, hv]`` (heads local to this TP rank; ``hk != hv`` under multi-latent
    attention); output ``[sq, b, np * hv]``. With ``packed_seq_params`` (``qkv_format="thd"``)
    Megatron squeezes the batch of one: ``query: [t, np, hk]``, ``key: [t, ng, hk]``,
    ``value: [t, ng, hv]``, output ``[t, np * hv]``, each sample of ``cu_seqlens_q_padded``
    (else ``cu_seqlens_q``) attending causally to itself only.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Multi-latent attention gives queries and keys a wider head than values (k_channels,
        # v_channels) and passes its softmax scale; scaled_dot_product_attention takes any widths.
        key_head_dim = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else key_head_dim**-0.5
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError(
                "PortableAttention takes no attention bias; use Transformer Engine's attention"
            )
        attn_mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None:
            return self._forward_packed(
                query, key, value, attention_mask, attn_mask_type, packed_seq_params
            )
        cp_rank, cp_size = self._context_parallel()
        local_length = query.shape[0]
        if cp_size > 1:
            sequence = [0, local_length * cp_size]
            order = context_parallel_order(sequence, cp_size, device=query.device)
            key = gather_context_parallel(key, self.cp_group, order)
            value = gather_context_parallel(value, self.cp_group, order)

        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        causal = attn_mask_type == AttnMaskType.causal
        if causal and cp_size > 1:
            q_pos = packed_positions(sequence, cp_rank, cp_size, device=query.device)
            k_pos = torch.arange(key.shape[0], device=query.device)
            allowed = k_pos[None, :] <= q_pos[:, None]
        elif causal and (attention_mask is not None or q.shape[2] != k.shape[2]):
            allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(
                k.shape[2] - q.shape[2]
            )
        if attention_mask is not None:
            # Megatron masks are True where attention is *not* allowed.
            keep = ~attention_mask.bool()
            allowed = keep if allowed is None else allowed & keep

        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = self._attend(q, k, v, allowed, causal, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(local_length, query.shape[1], -1)

    def _forward_packed(
        self, query, key, value, attention_mask, attn_mask_type, packed_seq_params
    ) -> torch.Tensor:
        """Packed (THD) samples: ``query: [t, np, hk]``, ``key: [t, ng, hk]``,
        ``value: [t, ng, hv]`` (this CP rank's ``t`` tokens) -> ``[t, np * hv]``, each sample
        attending causally to itself only.
        """
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(
                f"PortableAttention takes packed sequences in the 'thd' format, got "
                f"qkv_format={packed_seq_params.qkv_format!r}"
            )
        if attention_mask is not None:
            raise ValueError(
                "packed (THD) sequences carry their sample bounds in packed_seq_params: "
                "attention_mask must be None"
            )
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(
                f"PortableAttention's packed (THD) attention is causal within each sample; got "
                f"{attn_mask_type}"
            )
        cp_rank, cp_size = self._context_parallel()
        layout = packed_layout(packed_seq_params, cp_rank, cp_size, query.device)
        if layout.bounds[-1] != query.shape[0] * cp_size:
            raise ValueError(
                f"packed sample bounds end at {layout.bounds[-1]} but the pack holds "
                f"{query.shape[0]} tokens on each of {cp_size} context-parallel ranks: the last "
                f"bound (cu_seqlens_q_padded[-1]) must cover the whole pack, tail padding included "
                f"as a sample of its own"
            )
        dropout_p = self.dropout_p if self.training else 0.0
        if layout.groups is not None:
            with self._dropout_rng(dropout_p):
                return self._attend_groups(query, key, value, layout, dropout_p)
        key = gather_context_parallel(key, self.cp_group, layout.gather_order)
        value = gather_context_parallel(value, self.cp_group, layout.gather_order)

        # [t, heads, d] -> [1, heads, t, d]
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
        contexts = []
        with self._dropout_rng(dropout_p):
            bounds, local_bounds = layout.bounds, layout.local_bounds
            samples = zip(bounds[:-1], bounds[1:], local_bounds[:-1], local_bounds[1:])
            for sample, (start, end, local_start, local_end) in enumerate(samples):
                allowed = layout.allowed[sample] if layout.allowed is not None else None
                contexts.append(
                    self._attend(
                        q[:, :, local_start:local_end],
                        k[:, :, start:end],
                        v[:, :, start:end],
                        allowed,
                        causal=True,
                        dropout_p=dropout_p,
                    )
                )
        # [1, np, t, hv] -> [t, np * hv]; Megatron reshapes it to [t, 1, np * hv].
        return torch.cat(contexts, dim=2)[0].permute(1, 0, 2).reshape(query.shape[0], -1)

    def _attend_groups(self, query, key, value, layout, dropout_p: float) -> torch.Tensor:
        """Without CP: each length group of samples (:mod:`megarl.models.thd`) padded into one
        ``[n, heads, longest, d]`` batch and attended in one causal call -> ``[t, np * hv]``."""
        contexts = []
        for group in layout.groups:
            # [n * longest, heads, d] -> [n, heads, longest, d]
            q, k, v = (
                t.index_select(0, group.gather).view(group.count, group.length, *t.shape[1:]).transpose(1, 2)
                for t in (query, key, value)
            )
            context = self._attend(q, k, v, None, causal=True, dropout_p=dropout_p)
            contexts.append(context.transpose(1, 2).reshape(group.count * group.length, -1).index_select(0, group.kept))
        return torch.cat(contexts).index_select(0, layout.restore)

    def _context_parallel(self) -> tuple[int, int]:
        """This rank's ``(rank, size)`` in the context-parallel group; ``(0, 1)`` without one."""
        if self.cp_group is None or self.cp_group.size() == 1:
            return 0, 1
        return self.cp_group.rank(), self.cp_group.size()

    def _dropout_rng(self, dropout_p: float):
        """The RNG context of attention dropout: under tensor parallelism without SP each TP rank
        holds other heads, so dropout draws from the model-parallel stream, as Megatron's
        ``DotProductAttention`` does."""
        if dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _attend(self, q, k, v, allowed, causal: bool, dropout_p: float) -> torch.Tensor:
        """``q: [b, np, sq, hn]``, ``k, v: [b, ng, sk, hn]`` -> ``[b, np, sq, hn]``."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=dropout_p,
            is_causal=causal and allowed is None,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
