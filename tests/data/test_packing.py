"""Micro-batch tensors: right padding to a multiple, and packing with restarting positions."""

from __future__ import annotations

import pytest
import torch

from megarl.data.packing import pack_micro_batch, pad_micro_batch

pytestmark = pytest.mark.cpu

PAD = 0
PROMPTS = [[11, 12, 13], [21], [31, 32]]
RESPONSES = [[14, 15], [22, 23, 24, 25, 26], []]


@pytest.mark.parametrize("multiple, padded_length", [(1, 6), (4, 8), (6, 6)])
def test_padding_shapes_tokens_and_masks(multiple, padded_length):
    batch = pad_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=multiple)
    assert batch.tokens.shape == batch.position_ids.shape == batch.loss_mask.shape == (3, padded_length)
    assert batch.tokens.dtype == batch.position_ids.dtype == torch.int64 and batch.loss_mask.dtype == torch.bool
    assert batch.sequence_lengths.tolist() == [5, 6, 2]
    tail = [PAD] * (padded_length - 6)
    assert batch.tokens.tolist() == [[11, 12, 13, 14, 15, PAD] + tail, [21, 22, 23, 24, 25, 26] + tail, [31, 32, PAD, PAD, PAD, PAD] + tail]
    assert batch.loss_mask.int().tolist() == [[0, 0, 0, 1, 1, 0] + [0] * len(tail), [0, 1, 1, 1, 1, 1] + [0] * len(tail), [0] * padded_length]
    assert (batch.position_ids == torch.arange(padded_length)).all()


@pytest.mark.parametrize("multiple", [1, 4])
def test_packing_restarts_positions_and_marks_boundaries(multiple):
    batch = pack_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=multiple)
    padded = [5, 6, 2] if multiple == 1 else [8, 8, 4]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, padded[0], padded[0] + padded[1], sum(padded)]
    assert batch.tokens.shape == batch.position_ids.shape == batch.loss_mask.shape == (1, sum(padded))
    assert (batch.max_seqlen, batch.sequence_lengths.tolist()) == (max(padded), [5, 6, 2])
    assert batch.position_ids[0].tolist() == [position for length in padded for position in range(length)]
    for start, prompt, response in zip(batch.cu_seqlens.tolist(), PROMPTS, RESPONSES):
        end = start + len(prompt) + len(response)
        assert batch.tokens[0, start:end].tolist() == prompt + response
        assert batch.loss_mask[0, start:end].int().tolist() == [0] * len(prompt) + [1] * len(response)
    assert int(batch.loss_mask.sum()) == sum(len(response) for response in RESPONSES)
    assert int((batch.tokens != PAD).sum()) == 13


def test_packing_and_padding_hold_the_same_sequences():
    padded = pad_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=2)
    packed = pack_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=2)
    for row, (start, length) in enumerate(zip(packed.cu_seqlens.tolist(), packed.sequence_lengths.tolist())):
        assert torch.equal(packed.tokens[0, start : start + length], padded.tokens[row, :length])
        assert torch.equal(packed.loss_mask[0, start : start + length], padded.loss_mask[row, :length])


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one response per prompt"):
        pad_micro_batch(PROMPTS, RESPONSES[:2], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pack_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=0)
