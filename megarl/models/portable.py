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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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


def _chunk_order(cp_size: int) -> torch.Tensor:
    """Global chunk index of each position in the rank-major all-gather of load-balanced chunks.

    CP rank ``r`` holds chunks ``r`` and ``2*cp_size-1-r``; gathering rank by rank yields
    ``[0, 2cp-1, 1, 2cp-2, ...]``.
    """
    order = []
    for rank in range(cp_size):
        order += [rank, 2 * cp_size - 1 - rank]
    return torch.tensor(order)


class _GatherSequenceChunks(torch.autograd.Function):
    """All-gather ``[s/cp, ...]`` load-balanced halves into the full ``[s, ...]`` in sequence order.

    The backward reduce-scatters the gradient: every rank's K/V are read by the queries of all
    ranks, so each rank's gradient is the sum of what every rank's attention sends back.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        cp_size = group.size()
        ctx.group = group
        local = local.contiguous()
        gathered = torch.empty(
            (cp_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
        )
        dist.all_gather_into_tensor(gathered, local, group=group)
        chunks = gathered.chunk(2 * cp_size, dim=0)
        position_of_chunk = torch.argsort(_chunk_order(cp_size)).tolist()
        return torch.cat([chunks[i] for i in position_of_chunk], dim=0)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        group = ctx.group
        cp_size = group.size()
        chunks = grad_full.contiguous().chunk(2 * cp_size, dim=0)
        rank_major = torch.cat([chunks[i] for i in _chunk_order(cp_size).tolist()], dim=0)
        grad_local = torch.empty(
            (rank_major.shape[0] // cp_size, *rank_major.shape[1:]),
            dtype=rank_major.dtype,
            device=rank_major.device,
        )
        dist.reduce_scatter_tensor(grad_local, rank_major, group=group)
        return grad_local, None


def gather_sequence_chunks(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``local: [s/cp, ...]`` (this CP rank's two chunks) -> ``[s, ...]`` in sequence order."""
    return _GatherSequenceChunks.apply(local, group)


def local_positions(local_length: int, cp_rank: int, cp_size: int, device) -> torch.Tensor:
    """Sequence positions of this CP rank's tokens: ``[local_length]``."""
    chunk = local_length // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk, device=device)
    return torch.cat([first, second])


class PortableAttention(MegatronModule):
    """Core attention (softmax(QK^T)V) in plain torch, with GQA and context parallelism.

    Drop-in for Megatron's ``core_attention`` slot: same constructor and forward signature as
    ``DotProductAttention``. Inputs ``query: [sq, b, np, hk]``, ``key: [sk, b, ng, hk]``,
    ``value: [sk, b, ng, hv]`` (heads local to this TP rank; ``hk != hv`` under multi-latent
    attention); output ``[sq, b, np * hv]``.
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
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "PortableAttention takes padded [s, b, h, d] batches without attention bias; "
                "packed (THD) sequences need Transformer Engine's attention"
            )
        attn_mask_type = attn_mask_type or self.attn_mask_type
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        local_length = query.shape[0]
        if cp_size > 1:
            key = gather_sequence_chunks(key, self.cp_group)
            value = gather_sequence_chunks(value, self.cp_group)

        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        causal = attn_mask_type == AttnMaskType.causal
        if causal and cp_size > 1:
            q_pos = local_positions(local_length, self.cp_group.rank(), cp_size, query.device)
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
        if dropout_p > 0 and not self.config.sequence_parallel:
            # Dropout differs per TP rank (each holds other heads): draw from the model-parallel
            # RNG stream, as Megatron's DotProductAttention does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._attend(q, k, v, allowed, causal, dropout_p)
        else:
            context = self._attend(q, k, v, allowed, causal, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(local_length, query.shape[1], -1)

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
