"""Micro-batch tensors: right padding to a multiple."""

from __future__ import annotations

import pytest
import torch

from megarl.data.padding import pad_micro_batch

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


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one response per prompt"):
        pad_micro_batch(PROMPTS, RESPONSES[:2], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pad_micro_batch(PROMPTS, RESPONSES, pad_token_id=PAD, pad_to_multiple_of=0)
