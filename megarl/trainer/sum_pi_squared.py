"""The policy's sum of squared probabilities over the vocabulary at every token, from vocab-parallel
logits or from the last hidden states and the output layer's shard: ``sum_pi_squared``, an input of
the optimal token baseline (:func:`megarl.algorithms.advantages.optimal_token_baseline`).

Maths. A token has logits ``x`` over the vocabulary and the sampling temperature ``T``; with
``z = x / T`` and ``p = softmax(z)``::

    sum_v p_v^2 = sum_v exp(2 z_v) / (sum_v exp z_v)^2 = exp(logsumexp(2 z) - 2 logsumexp(z))

in ``[1 / V, 1]`` (uniform, certain). verl computes it as the right-hand side
(``calculate_sum_pi_squared_from_logits``) on the logits its actor has already divided by the
temperature, so both are the squared probabilities of the distribution the engine sampled from.

Vocab parallelism. Tensor-parallel rank ``r`` holds the columns ``[r V_local, (r + 1) V_local)`` of
the padded vocabulary; columns at or past ``vocab_size`` (Megatron's padding) never enter a sum, as
in :mod:`megarl.kernels.logprob_entropy`. Each rank reduces its valid columns to three statistics
per token, relative to its own largest logit ``m_r``::

    s_r = sum_v exp(z_v - m_r)        q_r = sum_v exp(2 (z_v - m_r))

and the group combines them with an all-reduce MAX of ``m`` (``M``) and one all-reduce SUM of the
rescaled terms::

    s = sum_r e^(m_r - M) s_r         q = sum_r e^(2 (m_r - M)) q_r         sum_v p_v^2 = q / s^2

Every term is at most 1 and ``s >= 1`` (the largest logit adds 1), so nothing overflows and the
division is safe; a rank without a valid column has ``m_r = -inf`` and adds 0.

Memory. The logits are formed and reduced in fp32 chunks of at most ``CHUNK_ROWS`` tokens by
``CHUNK_COLUMNS`` columns, combined per token as an online softmax combines them: from the hidden
states a chunk's logits are one product ``hidden[rows] @ weight[cols]^T``, so the
``[tokens, V / TP]`` logits never exist whole; from the logits only a chunk is upcast at a time.
No gradient: the value is an input of the advantage estimator, computed in the old-log-prob pass
(:meth:`megarl.trainer.policy.Policy.old_log_probs`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megarl.kernels.common import has_peers, valid_columns, vocab_range

CHUNK_COLUMNS = 4096
"""Vocabulary columns of a chunk: a chunk of the output weight upcast to fp32 is 4096 x H."""
CHUNK_ROWS = 4096
"""Tokens of a chunk: with ``CHUNK_COLUMNS``, a chunk's fp32 logits hold 2^24 elements (64 MiB)."""


def sum_pi_squared(
    logits: torch.Tensor, *, temperature: float, vocab_size: int | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``sum_v softmax(logits / temperature)_v^2`` of every token from vocab-parallel logits.

    Args:
        logits: ``[..., V / TP]``, this rank's contiguous shard of the (padded) vocabulary.
        temperature: the sampling temperature, > 0.
        vocab_size: the real vocabulary; columns at or past it are left out. None: every column.
        group: the tensor-parallel group the vocabulary is split over (None: not split).

    Returns:
        ``[...]`` float32, the same on every rank of ``group``.
    """
    _check_temperature(temperature)
    n_cols = logits.shape[-1]
    vocab_start, vocab_size = vocab_range(n_cols, vocab_size, group)
    rows = logits.reshape(-1, n_cols)

    def chunk_logits(row_chunk: slice, col_chunk: slice) -> torch.Tensor:
        return rows[row_chunk, col_chunk].float() / temperature

    statistics = _shard_statistics(chunk_logits, rows.shape[0], valid_columns(n_cols, vocab_start, vocab_size), logits.device)
    return _combine(*statistics, group).reshape(logits.shape[:-1])


def sum_pi_squared_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``sum_v softmax(hidden @ weight^T / temperature)_v^2`` of every token, the logits formed one
    chunk at a time.

    Args:
        hidden: ``[..., H]`` the last hidden states, the same on every rank of ``group``.
        weight: ``[V / TP, H]`` this rank's shard of the output layer (rows of the padded vocabulary).
        temperature: the sampling temperature, > 0.
        vocab_size: the real vocabulary; rows of ``weight`` at or past it are left out. None: every row.
        group: the tensor-parallel group the vocabulary is split over (None: not split).

    Returns:
        ``[...]`` float32, the same on every rank of ``group``.
    """
    _check_temperature(temperature)
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must share the last dimension H")
    n_cols = weight.shape[0]
    vocab_start, vocab_size = vocab_range(n_cols, vocab_size, group)
    rows = hidden.reshape(-1, hidden.shape[-1])

    def chunk_logits(row_chunk: slice, col_chunk: slice) -> torch.Tensor:
        return (rows[row_chunk].float() @ weight[col_chunk].float().T) / temperature

    statistics = _shard_statistics(chunk_logits, rows.shape[0], valid_columns(n_cols, vocab_start, vocab_size), hidden.device)
    return _combine(*statistics, group).reshape(hidden.shape[:-1])


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")


def _shard_statistics(
    chunk_logits: Callable[[slice, slice], torch.Tensor], n_rows: int, valid_cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's ``(m, s, q)``, each ``[n_rows]`` fp32, over its first ``valid_cols`` columns;
    ``chunk_logits(rows, cols)`` gives the fp32 ``z`` of a chunk."""
    row_max = torch.full((n_rows,), -torch.inf, dtype=torch.float32, device=device)
    sum_exp = torch.zeros(n_rows, dtype=torch.float32, device=device)
    sum_exp_squared = torch.zeros(n_rows, dtype=torch.float32, device=device)
    with torch.no_grad():
        for row_start in range(0, n_rows, CHUNK_ROWS):
            rows = slice(row_start, min(row_start + CHUNK_ROWS, n_rows))
            for col_start in range(0, valid_cols, CHUNK_COLUMNS):
                z = chunk_logits(rows, slice(col_start, min(col_start + CHUNK_COLUMNS, valid_cols)))
                chunk_max = z.amax(dim=-1)
                new_max = torch.maximum(row_max[rows], chunk_max)
                exp = (z - new_max[:, None]).exp_()
                # Rescale what the earlier column chunks added to the new max (0 before the first).
                old_scale = (row_max[rows] - new_max).exp()
                sum_exp[rows] = sum_exp[rows] * old_scale + exp.sum(dim=-1)
                sum_exp_squared[rows] = sum_exp_squared[rows] * old_scale.square() + exp.square_().sum(dim=-1)
                row_max[rows] = new_max
    return row_max, sum_exp, sum_exp_squared


def _combine(
    row_max: torch.Tensor, sum_exp: torch.Tensor, sum_exp_squared: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``q / s^2`` from every rank's ``(m_r, s_r, q_r)``, rescaled to the group's max."""
    if has_peers(group):
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        scale = (row_max - global_max).exp()
        sums = torch.stack((sum_exp * scale, sum_exp_squared * scale.square()))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_squared = sums.unbind(0)
    return sum_exp_squared / sum_exp.square()
