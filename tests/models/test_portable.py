"""PortableAttention on packed (THD) sequences, and the CP layout of packed samples.

The single-process tests compare the packed attention with a float64 reference that attends over
each sample on its own (explicit softmax, causal mask) and with the module's own padded path; the
multi-rank test runs context parallelism over two gloo processes (tests/models/portable_cp_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megarl.models.portable import PortableAttention
from megarl.models.thd import packed_positions
from tests.distributed import run_torchrun

WORKER = Path(__file__).with_name("portable_cp_worker.py")


def attention_module(heads: int, groups: int, key_width: int, softmax_scale=None) -> PortableAttention:
    """A PortableAttention without dropout or context parallelism."""
    config = TransformerConfig(
        num_layers=1, hidden_size=heads * key_width, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=key_width, attention_dropout=0.0,
    )
    return PortableAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=softmax_scale)


def thd_params(bounds: list[int]) -> PackedSeqParams:
    """THD parameters as the trainer builds them: the padded bounds are the bounds."""
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=longest, max_seqlen_kv=longest,
    )


def reference_attention(query, key, value, bounds: list[int], scale: float) -> torch.Tensor:
    """``query: [t, np, hk]``, ``key: [t, ng, hk]``, ``value: [t, ng, hv]`` -> ``[t, np * hv]``:
    each sample alone, causal, by the textbook formula."""
    repeat = query.shape[1] // key.shape[1]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].repeat_interleave(repeat, dim=1).transpose(0, 1)
        v = value[start:end].repeat_interleave(repeat, dim=1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) * scale
        future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        outputs.append((weights @ v).transpose(0, 1).reshape(end - start, -1))
    return torch.cat(outputs)


def inputs(tokens: int, heads: int, groups: int, key_width: int, value_width: int, dtype):
    generator = torch.Generator().manual_seed(tokens * 31 + heads)
    shapes = [(tokens, heads, key_width), (tokens, groups, key_width), (tokens, groups, value_width)]
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def values_and_gradients(attend, tensors):
    """The output of ``attend(*tensors)`` and the gradients of a fixed random projection of it."""
    output = attend(*tensors)
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(7), dtype=output.dtype)
    gradients = torch.autograd.grad((output * weight).sum(), tensors)
    return output, gradients


@pytest.mark.cpu
@pytest.mark.parametrize(
    "heads, groups, key_width, value_width, softmax_scale, lengths, dtype, tolerance",
    [
        # GQA; odd lengths, a sample of one token, and tail padding as the last sample.
        (4, 2, 8, 8, None, [5, 1, 7, 2, 3], torch.float64, 1e-12),
        # Multi-latent attention's widths: keys wider than values, its own softmax scale.
        (4, 4, 12, 8, 0.21, [6, 9, 1], torch.float64, 1e-12),
        # One sample: THD reduces to plain causal attention.
        (2, 1, 8, 4, None, [11], torch.float64, 1e-12),
        (4, 2, 8, 8, None, [5, 1, 7, 2, 3], torch.float32, 1e-6),
    ],
)
def test_packed_attention_matches_per_sample_reference(
    heads, groups, key_width, value_width, softmax_scale, lengths, dtype, tolerance
):
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    module = attention_module(heads, groups, key_width, softmax_scale)
    params = thd_params(bounds)
    tensors = inputs(bounds[-1], heads, groups, key_width, value_width, dtype)

    output, gradients = values_and_gradients(
        lambda q, k, v: module(q, k, v, None, packed_seq_params=params), tensors
    )
    expected, expected_gradients = values_and_gradients(
        lambda q, k, v: reference_attention(q, k, v, bounds, module.softmax_scale), tensors
    )
    assert output.shape == (bounds[-1], heads * value_width)
    torch.testing.assert_close(output, expected, atol=tolerance, rtol=0)
    for name, gradient, expected_gradient in zip("qkv", gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, atol=tolerance, rtol=0, msg=name)


@pytest.mark.cpu
def test_packed_attention_matches_the_padded_batch():
    """The same samples padded into ``[s, b, h, d]`` give the same rows and gradients."""
    lengths, longest = [3, 6, 1, 4], 6
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    module = attention_module(4, 2, 8)
    tensors = inputs(bounds[-1], 4, 2, 8, 8, torch.float64)

    def padded(query, key, value):
        columns = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            columns.append([torch.nn.functional.pad(t[start:end], (0, 0, 0, 0, 0, longest - (end - start))) for t in (query, key, value)])
        q, k, v = (torch.stack([column[i] for column in columns], dim=1) for i in range(3))
        output = module(q, k, v, None)  # [s, b, np * hv]
        return torch.cat([output[: end - start, row] for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))])

    output, gradients = values_and_gradients(lambda q, k, v: module(q, k, v, None, packed_seq_params=thd_params(bounds)), tensors)
    expected, expected_gradients = values_and_gradients(padded, tensors)
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=0)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-12, rtol=0)


@pytest.mark.cpu
def test_the_layout_is_read_once_per_micro_batch():
    """Every layer of a micro-batch shares one ``PackedSeqParams``: its bounds are read (a host
    sync on a GPU) by the first layer only."""
    bounds = [0, 3, 8]
    params = thd_params(bounds)
    layers = [attention_module(2, 2, 4), attention_module(2, 2, 4)]
    query, key, value = inputs(8, 2, 2, 4, 4, torch.float32)
    reads = []
    original = torch.Tensor.tolist

    def counting_tolist(tensor):
        reads.append(tensor)
        return original(tensor)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counting_tolist)
        for layer in layers:
            layer(query, key, value, None, packed_seq_params=params)
    assert len(reads) == 1


@pytest.mark.cpu
def test_malformed_packed_inputs_are_refused():
    module = attention_module(2, 2, 4)
    query, key, value = inputs(8, 2, 2, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"bounds end at 6 but the pack holds 8 tokens"):
        module(query, key, value, None, packed_seq_params=thd_params([0, 2, 6]))
    with pytest.raises(ValueError, match="must not decrease"):
        module(query, key, value, None, packed_seq_params=thd_params([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="attention_mask must be None"):
        module(query, key, value, torch.zeros(1, 1, 8, 8, dtype=torch.bool), packed_seq_params=thd_params([0, 8]))
    sbhd = thd_params([0, 8])
    sbhd.qkv_format = "sbhd"
    with pytest.raises(NotImplementedError, match="'thd' format"):
        module(query, key, value, None, packed_seq_params=sbhd)
    with pytest.raises(NotImplementedError, match="attention bias"):
        module(query, key, value, None, attention_bias=torch.zeros(1), packed_seq_params=thd_params([0, 8]))


@pytest.mark.cpu
def test_packed_positions_by_hand():
    assert packed_positions([0, 5, 6], 0, 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert packed_positions([0], 0, 1).tolist() == []
    # CP2: four chunks per sample; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert packed_positions([0, 8, 12], 0, 2).tolist() == [0, 1, 6, 7, 8, 11]
    assert packed_positions([0, 8, 12], 1, 2).tolist() == [2, 3, 4, 5, 9, 10]
    # CP3: six chunks of one token.
    assert [packed_positions([0, 6], rank, 3).tolist() for rank in range(3)] == [[0, 5], [1, 4], [2, 3]]
    # An empty sample holds nothing anywhere.
    assert packed_positions([0, 4, 4, 8], 1, 2).tolist() == [1, 2, 5, 6]
    assert packed_positions([0, 8, 12], 0, 2).dtype == torch.int64


@pytest.mark.cpu
def test_packed_positions_refuses_samples_cp_cannot_split():
    with pytest.raises(ValueError, match=r"sample 1 \(tokens 8:14\) has length 6, not a multiple of .* \(4\)"):
        packed_positions([0, 8, 14], 0, 2)
    with pytest.raises(ValueError, match="must start at 0"):
        packed_positions([2, 8], 0, 1)


@pytest.mark.multirank
def test_context_parallel_packed_attention_over_two_ranks():
    result = run_torchrun(WORKER, [], nproc=2, timeout=120)
    for rank in range(2):
        assert f"rank {rank}/2: packed, padded and dropout ok" in result.stdout, result.stdout
