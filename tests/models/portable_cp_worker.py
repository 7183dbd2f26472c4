"""PortableAttention under context parallelism over two real gloo processes (torchrun worker).

Every rank builds the same whole problem and runs it twice: on one process (a module without a CP
group) and split over the CP group of both ranks, each rank holding its rows (``packed_positions``).
Its output and the gradients of its query, key and value rows must equal the single-process ones
at those rows, for packed (THD) samples and for the padded ``[s, b, h, d]`` batch. Then dropout:
the packed path draws from Megatron's model-parallel RNG stream, reproducibly, and no sample's
tokens reach another's. Prints one ``ok`` line per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megarl import platform
from megarl.models.portable import PortableAttention
from megarl.models.thd import packed_positions

HEADS, GROUPS, KEY_WIDTH, VALUE_WIDTH, SOFTMAX_SCALE = 4, 2, 12, 8, 0.3
BOUNDS = [0, 8, 12, 28, 32]
"""Samples of 8, 4 and 16 tokens and 4 of tail padding: each a multiple of 2 * CP."""


def attention(cp_group, dropout: float = 0.0) -> PortableAttention:
    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * KEY_WIDTH, num_attention_heads=HEADS,
        num_query_groups=GROUPS, kv_channels=KEY_WIDTH, attention_dropout=dropout,
    )
    return PortableAttention(
        config, 1, AttnMaskType.causal, "self", softmax_scale=SOFTMAX_SCALE,
        k_channels=KEY_WIDTH, v_channels=VALUE_WIDTH, pg_collection=ProcessGroupCollection(cp=cp_group),
    )


def thd_params(bounds: list[int]) -> PackedSeqParams:
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens, max_seqlen_q=16, max_seqlen_kv=16,
    )


def problem(leading: tuple[int, ...]) -> list[torch.Tensor]:
    """Query, key and value of shape ``[*leading, heads, width]``, the same on every rank."""
    generator = torch.Generator().manual_seed(1)
    widths = [(HEADS, KEY_WIDTH), (GROUPS, KEY_WIDTH), (GROUPS, VALUE_WIDTH)]
    return [torch.randn((*leading, *shape), generator=generator, dtype=torch.float64) for shape in widths]


def run(module: PortableAttention, tensors: list[torch.Tensor], weight: torch.Tensor, **kwargs):
    """The output and the gradients of ``(output * weight).sum()`` with respect to ``tensors``."""
    tensors = [tensor.clone().requires_grad_() for tensor in tensors]
    output = module(*tensors, None, **kwargs)
    gradients = torch.autograd.grad((output * weight).sum(), tensors)
    return output, gradients


def check_rows(name: str, local, whole, rows: torch.Tensor) -> None:
    (output, gradients), (whole_output, whole_gradients) = local, whole
    torch.testing.assert_close(output, whole_output[rows], atol=1e-12, rtol=0, msg=f"{name} output")
    for tensor, gradient, whole_gradient in zip("qkv", gradients, whole_gradients):
        torch.testing.assert_close(gradient, whole_gradient[rows], atol=1e-12, rtol=0, msg=f"{name} grad {tensor}")


def check_packed(rank: int, cp_size: int) -> None:
    tensors = problem((BOUNDS[-1],))
    weight = torch.randn(BOUNDS[-1], HEADS * VALUE_WIDTH, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = packed_positions(BOUNDS, rank, cp_size)
    whole = run(attention(None), tensors, weight, packed_seq_params=thd_params(BOUNDS))
    local = run(attention(dist.group.WORLD), [t[rows] for t in tensors], weight[rows], packed_seq_params=thd_params(BOUNDS))
    check_rows("packed", local, whole, rows)


def check_padded(rank: int, cp_size: int) -> None:
    sequence, batch = 16, 2
    tensors = problem((sequence, batch))
    weight = torch.randn(sequence, batch, HEADS * VALUE_WIDTH, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = packed_positions([0, sequence], rank, cp_size)
    whole = run(attention(None), tensors, weight)
    local = run(attention(dist.group.WORLD), [t[rows] for t in tensors], weight[rows])
    check_rows("padded", local, whole, rows)


def check_dropout() -> None:
    """Dropout draws from the model-parallel RNG stream (the default generator is left alone), is
    reproducible from its seed, and keeps the samples apart."""
    module = attention(None, dropout=0.5)
    query, key, value = problem((BOUNDS[-1],))
    model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0)
    default_state = torch.get_rng_state()
    output = module(query, key, value, None, packed_seq_params=thd_params(BOUNDS))
    assert torch.equal(torch.get_rng_state(), default_state), "dropout drew from the default generator"
    model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0)
    again = module(query, key, value, None, packed_seq_params=thd_params(BOUNDS))
    torch.testing.assert_close(output, again, atol=0, rtol=0)
    without_dropout = module.eval()(query, key, value, None, packed_seq_params=thd_params(BOUNDS))
    assert not torch.allclose(output, without_dropout), "dropout changed nothing"
    # Another first sample leaves the other samples' attention as it was (dropout included).
    changed = [t.clone() for t in (query, key, value)]
    for tensor in changed:
        tensor[: BOUNDS[1]] += 1.0
    module.train()
    model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0)
    other = module(*changed, None, packed_seq_params=thd_params(BOUNDS))
    assert not torch.allclose(other[: BOUNDS[1]], output[: BOUNDS[1]])
    torch.testing.assert_close(other[BOUNDS[1] :], output[BOUNDS[1] :], atol=0, rtol=0)


def main() -> None:
    platform.init_distributed()
    rank, cp_size = dist.get_rank(), dist.get_world_size()
    check_packed(rank, cp_size)
    check_padded(rank, cp_size)
    check_dropout()
    print(f"rank {rank}/{cp_size}: packed, padded and dropout ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
