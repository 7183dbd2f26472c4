"""Weight mapping rules: the HF slices that form each tensor-parallel shard."""

from __future__ import annotations

import pytest
import torch

from megarl.models.exporter import assemble_hf
from megarl.models.loader import canonical_name
from megarl.models.mapping import (
    FusedGateUp,
    FusedQKV,
    Replicated,
    RowParallel,
    Segment,
    VocabParallel,
)

pytestmark = pytest.mark.cpu


def shard(rule, hf: dict[str, torch.Tensor], rank: int, size: int, local_length: int) -> torch.Tensor:
    """The loader's assembly, on in-memory tensors."""
    pieces = []
    for segment in rule.segments(local_length, rank, size):
        if segment.hf_name is None:
            reference = next(iter(hf.values()))
            shape = list(reference.shape)
            shape[rule.dim] = segment.length
            pieces.append(torch.zeros(shape))
        else:
            pieces.append(hf[segment.hf_name].narrow(rule.dim, segment.start, segment.length))
    return torch.cat(pieces, dim=rule.dim)


def test_fused_qkv_interleaves_query_groups_per_rank():
    # 4 heads in 2 groups of head_dim 3: per group [q q k v] rows.
    rule = FusedQKV("qkv", ("q", "k", "v"), num_query_groups=2, heads_per_group=2, head_dim=3)
    assert rule.segments(12, rank=1, size=2) == [Segment("q", 6, 12), Segment("k", 3, 6), Segment("v", 3, 6)]
    assert rule.hf_lengths(12, size=2) == {"q": 12, "k": 6, "v": 6}


def test_gate_up_each_rank_holds_both_halves():
    rule = FusedGateUp("fc1", ("gate", "up"))
    assert rule.segments(4, rank=1, size=2) == [Segment("gate", 2, 4), Segment("up", 2, 4)]


def test_vocab_padding_is_a_zero_segment_past_the_real_vocab():
    rule = VocabParallel("emb", ("embed",), vocab_size=100)
    assert rule.segments(64, rank=0, size=2) == [Segment("embed", 0, 64)]
    assert rule.segments(64, rank=1, size=2) == [Segment("embed", 64, 100), Segment(None, 0, 28)]
    # A rank entirely past the vocabulary holds only padding.
    assert rule.segments(64, rank=2, size=3) == [Segment(None, 0, 64)]
    assert rule.hf_lengths(64, size=2) == {"embed": 100}


def test_row_parallel_splits_columns_and_replicated_is_whole():
    assert RowParallel("proj", ("o",)).segments(8, rank=1, size=2) == [Segment("o", 8, 16)]
    assert Replicated("norm", ("n",)).segments(16, rank=1, size=2) == [Segment("n", 0, 16)]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_shards_reassemble_to_the_hf_tensors_exactly(size):
    generator = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(rows, 5, generator=generator) for name, rows in (("q", 16), ("k", 8), ("v", 8))}
    rule = FusedQKV("qkv", ("q", "k", "v"), num_query_groups=4, heads_per_group=2, head_dim=2)
    local_length = 32 // size
    shards = [shard(rule, hf, rank, size, local_length) for rank in range(size)]
    rebuilt = assemble_hf(rule, shards)
    assert all(torch.equal(rebuilt[name], hf[name]) for name in hf)


def test_expert_rules_keep_their_kind_when_instantiated():
    rule = FusedGateUp("layers.0.local_experts.{expert}.fc1", ("experts.{expert}.gate", "experts.{expert}.up"))
    assert rule.is_expert
    concrete = rule.instantiate(expert=5)
    assert concrete.is_expert and concrete.hf == ("experts.5.gate", "experts.5.up")
    with pytest.raises(ValueError, match="expert id"):
        rule.instantiate()


@pytest.mark.parametrize(
    "te_name,portable",
    [
        ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
        ("decoder.layers.3.mlp.linear_fc1.layer_norm_weight", "decoder.layers.3.pre_mlp_layernorm.weight"),
        ("decoder.layers.3.mlp.experts.linear_fc2.weight7", "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"),
        ("decoder.layers.3.mlp.router.weight", "decoder.layers.3.mlp.router.weight"),
    ],
)
def test_transformer_engine_names_translate_to_portable_names(te_name, portable):
    assert canonical_name(te_name) == portable
