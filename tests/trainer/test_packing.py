"""Packed micro-batches (megarl/trainer/packing.py): every sample's tokens, labels and values land
where the padded micro-batch has them; context-parallel ranks split every sample into the
load-balanced chunks and together hold each token once; the losses' grid gets back exactly the
pack's per-token results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megarl.trainer.batch import TrainBatch, pack_routed_experts
from megarl.models.thd import packed_positions
from megarl.trainer.packing import pack_bounds, pack_multiples, packed_micro_batch, to_grid

pytestmark = pytest.mark.cpu

LENGTHS = [(3, 4), (5, 1), (2, 9), (4, 4), (1, 2)]


def _batch(pad_multiple: int = 4, routing: bool = False) -> TrainBatch:
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 50, (prompt,), generator=generator).tolist() for prompt, _ in LENGTHS]
    responses = [torch.randint(1, 50, (response,), generator=generator).tolist() for _, response in LENGTHS]
    log_probs = [torch.rand(response, generator=generator).neg().tolist() for _, response in LENGTHS]
    batch = TrainBatch.from_samples(
        prompts, responses, log_probs, list(range(len(LENGTHS))), [False] * len(LENGTHS), pad_token_id=0, pad_multiple=pad_multiple
    )
    if routing:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 8, (prompt + response - 1, 3, 2)).astype(np.uint8) for prompt, response in LENGTHS]
        batch.routed_experts = pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], [1, 2], 8)
        batch.routed_lengths = torch.tensor([len(array) for array in arrays])
    return batch


def test_multiples_and_bounds():
    assert pack_multiples(1, False, 1) == (1, 1)
    assert pack_multiples(2, True, 1) == (1, 2)
    assert pack_multiples(2, False, 2) == (4, 4)
    assert pack_multiples(2, True, 2) == (4, 4)
    assert pack_multiples(4, True, 2) == (4, 8)
    assert pack_multiples(2, True, 3) == (6, 6)
    assert pack_bounds([3, 5], 1, 1) == [0, 3, 8]
    # Each sample rounded up to 4, then a tail segment to the pack multiple 8.
    assert pack_bounds([3, 5], 4, 8) == [0, 4, 12, 16]
    assert pack_bounds([3, 5], 1, 2, length=12) == [0, 3, 8, 12]
    # A long tail in segments no longer than the longest sample.
    assert pack_bounds([3, 5], 1, 1, length=20) == [0, 3, 8, 13, 18, 20]
    with pytest.raises(ValueError, match="cannot be padded"):
        pack_bounds([3, 5], 1, 2, length=6)


@pytest.mark.parametrize("multiples", [(1, 1), (1, 2), (4, 8)])
def test_tokens_labels_and_values_are_the_padded_micro_batchs(multiples):
    batch = _batch()
    rows = [2, 0, 4]
    padded = batch.micro_batch(rows, ["rollout_log_probs"])
    packed = packed_micro_batch(batch, rows, ["rollout_log_probs"], sample_multiple=multiples[0], pack_multiple=multiples[1])
    total = packed["tokens"].shape[1]
    assert total % multiples[1] == 0 and int(packed["cu_seqlens"][-1]) == total
    real = packed["token_rows"][0] >= 0
    assert int(real.sum()) == sum(-(-int(batch.sequence_lengths[row]) // multiples[0]) * multiples[0] for row in rows)
    for position in real.nonzero().flatten().tolist():
        row, column = int(packed["token_rows"][0, position]), int(packed["token_columns"][0, position])
        slot = rows.index(row)
        assert packed["tokens"][0, position] == padded["tokens"][slot, column]
        # The label is the same row's next token: never the next sample's first.
        assert packed["labels"][0, position] == padded["labels"][slot, column]
        assert packed["position_ids"][0, position] == column
        assert bool(packed["token_valid"][0, position]) == bool(padded["token_valid"][slot, column])
    assert torch.equal(packed["response_mask"], padded["response_mask"])
    assert torch.equal(packed["rollout_log_probs"], padded["rollout_log_probs"])
    # The longest segment, not the pack.
    segments = packed["cu_seqlens"].diff()
    assert int(packed["max_seqlen"]) == int(segments.max())


def test_a_batch_padded_for_another_layout_is_refused():
    with pytest.raises(ValueError, match="not of the sample multiple 4"):
        packed_micro_batch(_batch(pad_multiple=2), [0, 1], [], sample_multiple=4, pack_multiple=4, cp_rank=0, cp_size=2)


def test_context_parallel_ranks_hold_every_token_once_and_score_their_own():
    batch = _batch(pad_multiple=4)
    rows = [0, 1, 2, 3, 4]
    parts = [packed_micro_batch(batch, rows, [], sample_multiple=4, pack_multiple=4, cp_rank=rank, cp_size=2) for rank in range(2)]
    whole = packed_micro_batch(batch, rows, [], sample_multiple=4, pack_multiple=4)
    assert torch.equal(parts[0]["cu_seqlens"], whole["cu_seqlens"])
    positions = torch.cat([packed_positions(whole["cu_seqlens"].tolist(), rank, 2) for rank in range(2)])
    assert sorted(positions.tolist()) == list(range(whole["tokens"].shape[1]))
    for rank, part in enumerate(parts):
        local = packed_positions(whole["cu_seqlens"].tolist(), rank, 2)
        assert torch.equal(part["tokens"][0], whole["tokens"][0, local])
        assert torch.equal(part["labels"][0], whole["labels"][0, local])
    # Each response token is scored on exactly one rank.
    assert torch.equal(parts[0]["response_mask"].int() + parts[1]["response_mask"].int(), whole["response_mask"].int())


def test_to_grid_puts_each_tokens_result_at_its_row_and_column():
    batch = _batch()
    rows = [3, 1]
    packed = packed_micro_batch(batch, rows, [], sample_multiple=1, pack_multiple=4)
    values = torch.arange(packed["tokens"].shape[1], dtype=torch.float64)[None].requires_grad_()
    grid = to_grid(packed, values)
    assert grid.shape == (2, batch.micro_batch_length(rows))
    for position in range(values.shape[1]):
        row = int(packed["token_rows"][0, position])
        if row >= 0:
            assert grid[rows.index(row), int(packed["token_columns"][0, position])] == position
    grid.sum().backward()
    # The tail's results reach no loss.
    assert torch.equal(values.grad[0], (packed["token_rows"][0] >= 0).double())
    padded = batch.micro_batch(rows, [])
    assert to_grid(padded, padded["tokens"]) is padded["tokens"]


def test_routed_experts_follow_their_tokens():
    batch = _batch(routing=True)
    rows = [4, 2]
    packed = packed_micro_batch(batch, rows, [], sample_multiple=1, pack_multiple=8)
    experts, token_rows, token_columns = packed["routed_experts"][0], packed["token_rows"][0], packed["token_columns"][0]
    real = token_rows >= 0
    assert torch.equal(experts[real], batch.routed_experts[token_rows[real], token_columns[real]])
    routed = packed["token_routed"][0]
    assert torch.equal(routed[real], token_columns[real] < batch.routed_lengths[token_rows[real]])
    assert not routed[~real].any()
