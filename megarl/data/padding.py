"""One micro-batch as model inputs: sequences right-padded into rows.

A sequence is its prompt tokens followed by its response tokens. ``loss_mask`` marks the response
tokens where they sit in ``tokens``; the log-prob of the token at ``t`` comes from the logits at
``t - 1``, so a trainer scores ``tokens[:, 1:]`` with ``logits[:, :-1]`` under ``loss_mask[:, 1:]``.
Padding comes after every real token of its sequence, so under causal attention no real token sees
it and no attention mask is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass(slots=True)
class PaddedBatch:
    """Sequences right-padded to a common length ``s``."""

    tokens: torch.Tensor
    """``[b, s]`` int64; ``pad_token_id`` past each sequence's end."""
    position_ids: torch.Tensor
    """``[b, s]`` int64: ``0 .. s - 1`` on every row."""
    loss_mask: torch.Tensor
    """``[b, s]`` bool: true on response tokens."""
    sequence_lengths: torch.Tensor
    """``[b]`` int64: prompt + response tokens of each row, padding excluded."""


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _check(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_to_multiple_of: int) -> None:
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"need one response per prompt and at least one sequence, got {len(prompt_ids)} prompts and {len(response_ids)} responses")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of ({pad_to_multiple_of}) must be >= 1")


def pad_micro_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_token_id: int, pad_to_multiple_of: int = 1
) -> PaddedBatch:
    """Right-pad the sequences of one micro-batch into ``[b, s]`` tensors.

    Args:
        prompt_ids: ``b`` prompts' tokens.
        response_ids: ``b`` responses' tokens, in the same order.
        pad_token_id: the token written into padding (never scored).
        pad_to_multiple_of: ``s`` is the longest sequence rounded up to this multiple (TP with
            sequence parallelism, 2 x CP with context parallelism).

    Returns:
        The padded batch, on CPU.
    """
    _check(prompt_ids, response_ids, pad_to_multiple_of)
    lengths = [len(prompt) + len(response) for prompt, response in zip(prompt_ids, response_ids)]
    length = _round_up(max(lengths), pad_to_multiple_of)
    # Filled row by row in numpy and handed to torch once: a torch call per row costs more than the
    # copy (and on the CPU each passes through megarl.megatron_compat's torch-function mode).
    tokens = np.full((len(lengths), length), pad_token_id, dtype=np.int64)
    loss_mask = np.zeros((len(lengths), length), dtype=np.bool_)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        tokens[row, : len(prompt)] = prompt
        tokens[row, len(prompt) : lengths[row]] = response
        loss_mask[row, len(prompt) : lengths[row]] = True
    position_ids = torch.arange(length, dtype=torch.int64).expand(len(lengths), length).contiguous()
    return PaddedBatch(torch.from_numpy(tokens), position_ids, torch.from_numpy(loss_mask), torch.tensor(lengths, dtype=torch.int64))
