"""The planner: shards planned from the mapping rules reassemble into HF tensors exactly, in
buckets of the configured size, whether the destination holds the shards or receives them."""

from __future__ import annotations

import pytest
import torch

from megarl.models.mapping import (
    ColumnParallel,
    FusedGateUp,
    FusedQKV,
    Replicated,
    RowParallel,
    VocabParallel,
)
from megarl.weights.bucket import Bucket
from megarl.weights.copy_plan import execute_copy_plan
from megarl.weights.planner import (
    MESSAGE_ALIGNMENT,
    ParameterLayout,
    assign_buckets,
    plan_rank,
    unique_hf_tensors,
)

pytestmark = pytest.mark.cpu

HIDDEN = 6
# (rule, HF tensor shapes, Megatron shard length along the rule's dim for a TP size).
CASES = {
    "replicated": (Replicated("norm", ("norm.w",)), {"norm.w": (HIDDEN,)}, lambda size: HIDDEN),
    "column": (ColumnParallel("fc", ("fc.w",)), {"fc.w": (12, HIDDEN)}, lambda size: 12 // size),
    "row": (RowParallel("proj", ("o.w",)), {"o.w": (HIDDEN, 12)}, lambda size: 12 // size),
    # 100 rows padded to 128 (384 for TP 3, where ranks 1 and 2 hold only padding).
    "vocab": (
        VocabParallel("emb", ("emb.w",), vocab_size=100),
        {"emb.w": (100, HIDDEN)},
        lambda size: 128 // size if size != 3 else 128,
    ),
    "qkv": (
        FusedQKV("qkv", ("q.w", "k.w", "v.w"), num_query_groups=6, heads_per_group=2, head_dim=3),
        {"q.w": (36, HIDDEN), "k.w": (18, HIDDEN), "v.w": (18, HIDDEN)},
        lambda size: 72 // size,
    ),
    "qkv_bias": (
        FusedQKV("qkv.b", ("q.b", "k.b", "v.b"), num_query_groups=6, heads_per_group=2, head_dim=3),
        {"q.b": (36,), "k.b": (18,), "v.b": (18,)},
        lambda size: 72 // size,
    ),
    "gate_up": (
        FusedGateUp("fc1", ("gate.w", "up.w")),
        {"gate.w": (12, HIDDEN), "up.w": (12, HIDDEN)},
        lambda size: 24 // size,
    ),
}


def hf_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def shard_of(rule, hf: dict[str, torch.Tensor], rank: int, size: int, local_length: int) -> torch.Tensor:
    """The loader's assembly of one shard, on in-memory tensors (zeros for padding)."""
    pieces = []
    for segment in rule.segments(local_length, rank, size):
        if segment.hf_name is None:
            shape = list(next(iter(hf.values())).shape)
            shape[rule.dim] = segment.length
            pieces.append(torch.zeros(shape))
        else:
            pieces.append(hf[segment.hf_name].narrow(rule.dim, segment.start, segment.length))
    return torch.cat(pieces, dim=rule.dim).contiguous()


def model(size: int, kinds=tuple(CASES)):
    """Parameter layouts, every rank's shards, and the HF tensors they come from."""
    layouts, shards, hf = [], {}, {}
    for seed, kind in enumerate(kinds):
        rule, shapes, shard_length = CASES[kind]
        tensors = hf_tensors(shapes, seed)
        hf.update(tensors)
        num_shards = size if rule.parallel else 1
        for rank in range(num_shards):
            shards[(len(layouts), rank)] = shard_of(rule, tensors, rank, num_shards, shard_length(size))
        shard_shape = tuple(shards[(len(layouts), 0)].shape)
        layouts.append(ParameterLayout(rule=rule, shard_shape=shard_shape, dtype=torch.float32, num_shards=num_shards))
    return layouts, shards, hf


def assemble_locally(layouts, shards, dtype, bucket_bytes) -> list[Bucket]:
    """Every shard on the destination: one plan per bucket over the shards in place."""
    keys = list(shards)
    local = {key: index for index, key in enumerate(keys)}
    tensors = [shards[key] for key in keys]
    plans = plan_rank(layouts, {key: 0 for key in keys}, local, rank=0, dst=0, dtype=dtype, bucket_bytes=bucket_bytes)
    buckets = []
    for plan in plans:
        out = torch.full((plan.out_bytes,), 0xAB, dtype=torch.uint8)
        staging = torch.empty(0, dtype=torch.uint8)
        execute_copy_plan(plan.plan, [staging, *(tensors[i] for i in plan.local_tensors)], out)
        buckets.append(Bucket(buffer=out, metas=list(plan.metas)))
    return buckets


def assert_buckets_hold(buckets: list[Bucket], hf: dict[str, torch.Tensor], dtype):
    got = dict(name_tensor for bucket in buckets for name_tensor in bucket.named_tensors())
    assert list(got) == list(hf)
    for name, tensor in hf.items():
        expected = tensor if dtype is None else tensor.to(dtype)
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_rule_reassembles_exactly(size, dtype):
    kinds = [kind for kind in CASES if size != 3 or kind not in ("column", "row", "gate_up")]
    layouts, shards, hf = model(size, kinds)
    assert_buckets_hold(assemble_locally(layouts, shards, dtype, bucket_bytes=1 << 20), hf, dtype)


def test_rows_of_a_row_parallel_shard_are_one_strided_copy():
    layouts, shards, _ = model(2, ["row"])
    local = {key: index for index, key in enumerate(shards)}
    plans = plan_rank(layouts, {key: 0 for key in shards}, local, rank=0, dst=0, dtype=None, bucket_bytes=1 << 20)
    # One copy per shard: HIDDEN rows of 6 elements, 24 bytes apart in the shard, 48 in o_proj.
    assert plans[0].plan[:, 2:7].tolist() == [[24, 0, 48, HIDDEN, 6], [24, 24, 48, HIDDEN, 6]]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_sent_shards_arrive_through_messages(dtype):
    """Rank 0 assembles; ranks 1 and 2 send the shards of TP ranks 1 and 2 (wire dtype = stream dtype)."""
    size = 3
    layouts, shards, hf = model(size, ["replicated", "vocab", "qkv", "qkv_bias"])
    senders = {key: key[1] for key in shards}
    locals_by_rank = {
        rank: {key: index for index, key in enumerate(k for k in shards if senders[k] == rank)} for rank in range(size)
    }
    tensors_by_rank = {rank: [shards[key] for key in local] for rank, local in locals_by_rank.items()}
    plans = {
        rank: plan_rank(layouts, senders, locals_by_rank[rank], rank=rank, dst=0, dtype=dtype, bucket_bytes=600)
        for rank in range(size)
    }
    assert len(plans[0]) > 1
    empty = torch.empty(0, dtype=torch.uint8)
    buckets = []
    for index, plan in enumerate(plans[0]):
        staging = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
        for message in plan.messages:
            sender_plan = plans[message.sender][index]
            assert sender_plan.out_bytes == message.nbytes and message.offset % MESSAGE_ALIGNMENT == 0
            sent = torch.zeros(sender_plan.out_bytes, dtype=torch.uint8)
            tensors = tensors_by_rank[message.sender]
            execute_copy_plan(sender_plan.plan, [empty, *(tensors[i] for i in sender_plan.local_tensors)], sent)
            staging[message.offset : message.offset + message.nbytes] = sent
        out = torch.zeros(plan.out_bytes, dtype=torch.uint8)
        execute_copy_plan(plan.plan, [staging, *(tensors_by_rank[0][i] for i in plan.local_tensors)], out)
        buckets.append(Bucket(buffer=out, metas=list(plan.metas)))
    # A rank that sends nothing for a bucket has an empty plan for it.
    for rank in (1, 2):
        for index, plan in enumerate(plans[rank]):
            if rank not in [message.sender for message in plans[0][index].messages]:
                assert plan.out_bytes == 0 and plan.plan.shape[0] == 0
    assert_buckets_hold(buckets, hf, dtype)


def test_buckets_respect_the_cap_and_big_parameters_travel_alone():
    layouts, _, _ = model(1, ["replicated", "column", "qkv"])
    sizes = [4 * HIDDEN, 4 * 12 * HIDDEN, 4 * 72 * HIDDEN]
    buckets = assign_buckets(layouts, None, bucket_bytes=sizes[0] + sizes[1])
    assert [indices for indices, _ in buckets] == [[0, 1], [2]]
    assert [metas[-1].end for _, metas in buckets] == [sizes[0] + sizes[1], sizes[2]]
    # A cap below a parameter: it gets a bucket of its own size.
    buckets = assign_buckets(layouts, torch.bfloat16, bucket_bytes=8)
    assert [metas[-1].end for _, metas in buckets] == [size // 2 for size in sizes]


def test_tied_output_layer_travels_once_and_duplicates_are_refused():
    embedding = VocabParallel("embedding", ("embed",), vocab_size=10)
    output = VocabParallel("output", ("embed",), vocab_size=10)
    layouts = [
        ParameterLayout(rule=rule, shard_shape=(128, 4), dtype=torch.float32, num_shards=1)
        for rule in (embedding, output)
    ]
    assert unique_hf_tensors(layouts) == layouts[:1]
    with pytest.raises(ValueError, match="embed comes from two parameters"):
        assign_buckets(layouts, None, bucket_bytes=1 << 20)


def test_a_rule_that_does_not_match_the_shape_is_reported():
    rule = FusedGateUp("fc1", ("gate", "up"))
    layout = ParameterLayout(rule=rule, shard_shape=(5, 4), dtype=torch.float32, num_shards=1)
    with pytest.raises(ValueError, match="cover 4 of the shard's 5 entries"):
        plan_rank([layout], {(0, 0): 0}, {(0, 0): 0}, rank=0, dst=0, dtype=None, bucket_bytes=1 << 20)


def test_senders_come_from_the_destinations_node_where_it_holds_a_copy():
    from megarl.weights.layout import choose_senders

    holders = {(0, 0): (0, 4), (1, 0): (1, 5), (2, 0): (2,), (3, 0): (4, 5)}
    # Destination rank 4 leads the node of ranks 4-7.
    assert choose_senders(holders, 4, nearby=range(4, 8)) == {(0, 0): 4, (1, 0): 5, (2, 0): 2, (3, 0): 4}
    assert choose_senders(holders, 4) == {(0, 0): 4, (1, 0): 1, (2, 0): 2, (3, 0): 4}
