"""TrainBatch: label-space alignment, micro-batches, context-parallel columns, selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import numpy as np

from megarl.config import layout_multiple
from megarl.models.thd import packed_positions
from megarl.trainer.batch import ScoredSample, TrainBatch, pack_routed_experts, routing_filler

pytestmark = pytest.mark.cpu

PAD = 0


def make_batch(pad_multiple: int = 1) -> TrainBatch:
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    log_probs = [[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6], [-0.7]]
    return TrainBatch.from_samples(
        prompts, responses, log_probs, group_ids=[0, 0, 1], truncated=[False, True, False], pad_token_id=PAD, pad_multiple=pad_multiple
    )


def test_label_space_holds_each_response_token_at_the_position_that_predicts_it():
    batch = make_batch()
    # Row 1: prompt [8, 9], response [22..25]: token 22 sits at position 2 and is predicted at 1.
    assert batch.tokens[1].tolist() == [8, 9, 22, 23, 24, 25]
    assert batch.tokens[2].tolist() == [10, 11, 12, 13, 26, PAD]
    assert batch.response_mask[1].tolist() == [False, True, True, True, True, False]
    assert batch.token_values["rollout_log_probs"][1, 1:5].tolist() == pytest.approx([-0.3, -0.4, -0.5, -0.6])
    assert batch.token_values["rollout_log_probs"][1][~batch.response_mask[1]].abs().sum() == 0
    for row in range(batch.size):
        predicted = batch.tokens[row, 1:][batch.response_mask[row, :-1]]
        start = int(batch.sequence_lengths[row] - batch.response_lengths[row])
        assert predicted.tolist() == batch.tokens[row, start : int(batch.sequence_lengths[row])].tolist()
    assert not batch.response_mask[:, -1].any()


def test_scored_samples_pack_as_their_fields_say():
    samples = [
        ScoredSample(prompt_ids=[5, 6, 7], response_ids=[20, 21], rollout_log_probs=[-0.1, -0.2], finish_reason="stop", group=0, score=1.0),
        ScoredSample(prompt_ids=[8, 9], response_ids=[22, 23, 24, 25], rollout_log_probs=[-0.3, -0.4, -0.5, -0.6], finish_reason="length", group=0, score=0.0),
        ScoredSample(prompt_ids=[10, 11, 12, 13], response_ids=[26], rollout_log_probs=[-0.7], finish_reason="stop", group=1, score=0.5, weight_version="3"),
    ]
    packed, expected = TrainBatch.from_scored(samples, pad_token_id=PAD, pad_multiple=4), make_batch(pad_multiple=4)
    assert [sample.truncated for sample in samples] == [False, True, False]
    for name in ("tokens", "response_mask", "sequence_lengths", "response_lengths", "group_ids", "truncated"):
        assert torch.equal(getattr(packed, name), getattr(expected, name)), name
    assert torch.equal(packed.token_values["rollout_log_probs"], expected.token_values["rollout_log_probs"])


def test_a_loss_mask_leaves_its_tokens_out_of_the_response_mask():
    samples = [
        ScoredSample(prompt_ids=[5, 6, 7], response_ids=[20, 21, 22], rollout_log_probs=[-0.1, -0.2, -0.3], finish_reason="stop", group=0, score=1.0,
                     loss_mask=[False, True, True]),
        ScoredSample(prompt_ids=[8, 9], response_ids=[22, 23], rollout_log_probs=[-0.3, -0.4], finish_reason="stop", group=0, score=0.0),
    ]
    masked = TrainBatch.from_scored(samples, pad_token_id=PAD, pad_multiple=1)
    unmasked = TrainBatch.from_scored([dataclasses.replace(sample, loss_mask=None) for sample in samples], pad_token_id=PAD, pad_multiple=1)
    assert masked.response_mask[0].tolist() == [False, False, False, True, True, False]  # labels: tokens 21, 22
    assert torch.equal(masked.response_mask[1], unmasked.response_mask[1])
    assert torch.equal(masked.token_values["rollout_log_probs"], unmasked.token_values["rollout_log_probs"])
    with pytest.raises(ValueError, match="sample 0: a loss mask of 1 tokens for 2 response tokens"):
        TrainBatch.from_samples([[1, 2]], [[3, 4]], [[-1.0, -1.0]], [0], [False], pad_token_id=PAD, pad_multiple=1, loss_masks=[[True]])


def test_log_prob_count_must_match_the_response():
    with pytest.raises(ValueError, match="sample 0: 1 rollout log-probs for 2 response tokens"):
        TrainBatch.from_samples([[1, 2]], [[3, 4]], [[-1.0]], [0], [False], pad_token_id=PAD, pad_multiple=1)


def test_micro_batch_labels_are_the_next_tokens_and_columns_are_trimmed():
    batch = make_batch(pad_multiple=4)
    micro = batch.micro_batch([0, 2], ["rollout_log_probs"])
    assert micro["tokens"].shape == (2, 8)  # longest of rows 0 and 2 is 5, rounded up to 8
    assert torch.equal(micro["labels"][:, :-1], micro["tokens"][:, 1:])
    assert torch.equal(micro["rollout_log_probs"], batch.token_values["rollout_log_probs"][[0, 2], :8])
    assert micro["rows"].tolist() == [0, 2]
    assert torch.equal(micro["position_ids"][0], torch.arange(8))


@pytest.mark.parametrize("cp_size", [1, 2, 3])
def test_context_parallel_ranks_hold_every_column_once_in_balanced_chunks(cp_size):
    length = 2 * cp_size * 5
    columns = torch.cat([packed_positions([0, length], rank, cp_size) for rank in range(cp_size)])
    assert sorted(columns.tolist()) == list(range(length))
    if cp_size > 1:
        # Rank 0 holds the first and the last chunk: causal attention work is balanced.
        first = packed_positions([0, length], 0, cp_size)
        assert first[0] == 0 and first[-1] == length - 1


def test_micro_batch_on_a_context_parallel_rank_keeps_its_columns():
    batch = make_batch(pad_multiple=4)
    full = batch.micro_batch([1], ["rollout_log_probs"])
    parts = [batch.micro_batch([1], ["rollout_log_probs"], cp_rank=rank, cp_size=2) for rank in range(2)]
    for part in parts:
        assert torch.equal(part["labels"], full["labels"][:, part["columns"]])
        assert torch.equal(part["position_ids"][0], part["columns"])
        assert torch.equal(part["rollout_log_probs"], full["rollout_log_probs"][:, part["columns"]])


def test_layout_multiple():
    assert layout_multiple(1, False, 1) == 1
    assert layout_multiple(4, False, 1) == 1
    assert layout_multiple(4, True, 1) == 4
    assert layout_multiple(2, True, 3) == 6
    # Each CP rank's half of the sequence splits over the 4 TP ranks.
    assert layout_multiple(4, True, 2) == 8



def routed(tokens: int, layers: int = 3, topk: int = 2, offset: int = 0) -> np.ndarray:
    """Distinct experts per token and layer: ``(token + layer + offset + j) % 8`` for j < k."""
    grid = np.arange(tokens)[:, None, None] + np.arange(layers)[None, :, None] + np.arange(topk)[None, None, :] + offset
    return (grid % 8).astype(np.uint8)


def test_routed_experts_are_packed_at_their_tokens_and_moe_layers_with_a_filler_past_them():
    batch = make_batch(pad_multiple=4)
    # Every token but the last of each sample, as SGLang returns them; layer 1 is dense.
    arrays = [routed(int(length) - 1, offset=row) for row, length in enumerate(batch.sequence_lengths)]
    packed = pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], moe_layers=[0, 2], num_experts=8)
    assert packed.shape == (3, 8, 2, 2) and packed.dtype == torch.uint8
    for row, array in enumerate(arrays):
        covered = array.shape[0]
        assert packed[row, :covered].tolist() == array[:, [0, 2]].tolist()
        # Past them, position t routes to experts 2t and 2t + 1 (mod 8) in every MoE layer.
        filler = [[[(2 * t) % 8, (2 * t + 1) % 8]] * 2 for t in range(covered, 8)]
        assert packed[row, covered:].tolist() == filler


@pytest.mark.parametrize(
    "arrays,message",
    [
        ([routed(4), None, routed(4)], "sample 1 has no routed experts"),
        ([routed(4), routed(7), routed(4)], r"sample 1: routed experts of shape \(7, 3, 2\) for 6 tokens"),
        ([routed(4), routed(5, layers=2), routed(4)], r"sample 1: routed experts of shape \(5, 2, 2\)"),
        ([routed(4), routed(5) + 8, routed(4)], "sample 1: routed experts outside 0 .. 7"),
    ],
)
def test_routed_experts_that_do_not_fit_the_sample_or_the_model_are_refused_naming_it(arrays, message):
    batch = make_batch()
    with pytest.raises(ValueError, match=message):
        pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], moe_layers=[0, 2], num_experts=8)


def test_a_micro_batch_carries_the_routed_experts_of_its_rows_and_context_parallel_columns():
    batch = make_batch(pad_multiple=4)
    batch.routed_experts = torch.arange(3 * 8 * 2 * 2, dtype=torch.int32).reshape(3, 8, 2, 2).to(torch.uint8)
    micro = batch.micro_batch([2, 0], fields=(), cp_rank=1, cp_size=2)
    columns = packed_positions([0, 8], 1, 2)
    assert torch.equal(micro["routed_experts"], batch.routed_experts[[2, 0]][:, columns])
    assert micro["sequence_lengths"].tolist() == [5, 5]


@pytest.mark.parametrize("experts,topk,dtype", [(8, 2, torch.uint8), (6, 4, torch.uint8), (384, 8, torch.int16)])
def test_the_routing_filler_gives_each_token_distinct_experts_spread_over_all_of_them(experts, topk, dtype):
    filler = routing_filler(3 * experts, topk, experts)
    assert filler.dtype == dtype
    assert all(len(set(row)) == topk for row in filler.tolist())
    # Over 3 x E tokens every expert is used 3 x k times.
    assert torch.bincount(filler.long().flatten(), minlength=experts).tolist() == [3 * topk] * experts


def test_a_micro_batch_can_be_given_a_longer_length_than_its_rows_need():
    # The batch is 6 columns wide (row 1); row 0 needs 5.
    batch = make_batch()
    assert batch.micro_batch_length([0]) == 5
    micro = batch.micro_batch([0], fields=(), length=6)
    assert micro["tokens"].shape == (1, 6) and micro["columns"].tolist() == list(range(6))
    assert micro["tokens"][0, 5] == PAD and not micro["response_mask"][0, 4:].any()
