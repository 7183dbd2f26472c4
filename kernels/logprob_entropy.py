"""Per-token log-probability and entropy from vocab-parallel logits, without a log-softmax copy.

Maths. One token has logits ``x`` over the vocabulary, a target id ``t`` and a sampling
temperature ``T``. With ``z = x / T``, ``lse = log sum_j exp z_j`` and ``log p_j = z_j - lse``::

    log_prob = z_t - lse
    entropy  = -sum_j p_j log p_j = lse - sum_j p_j z_j

Vocab parallelism. Tensor-parallel rank ``r`` holds the contiguous columns
``[r * V_local, (r + 1) * V_local)`` of the (padded) vocabulary; columns at or past ``vocab_size``
(Megatron pads the vocabulary to a multiple of 128 x TP) and block padding past ``V_local`` never
enter a sum. Each rank reduces its valid columns to four partial statistics per row (the *stats
pass*, op ``megarl::logprob_entropy_stats``)::

    m_r = max z_j      s_r = sum exp(z_j - m_r)      w_r = sum exp(z_j - m_r) (z_j - m_r)
    t_r = z_t if this rank owns the target, else 0

They combine over the group with an all-reduce MAX of ``m`` and an all-reduce SUM of the terms
rescaled to the global max ``M`` (:func:`megarl.kernels.common.reduce_partial_stats`)::

    s = sum_r e^(m_r - M) s_r    w = sum_r e^(m_r - M) (w_r + (m_r - M) s_r)    t = sum_r t_r
    lse = M + log s              log_prob = t - lse                         entropy = log s - w / s

Keeping ``w`` relative to the max avoids the cancellation of ``lse - sum p z`` at large logits.
Targets outside ``[0, vocab_size)`` (padding such as -100) get log-prob 0 and no log-prob gradient.

Gradient. For any loss ``L(log_prob, entropy)`` with ``a = dL/dlog_prob`` and
``b = dL/dentropy``: ``d log p_t / dz_j = 1[j = t] - p_j``; since ``dp_k / dz_j = p_k (1[k = j] - p_j)``,
``dH / dz_j = -sum_k dp_k/dz_j (log p_k + 1) = -p_j (log p_j + 1) + p_j (1 - H) = -p_j (log p_j + H)``.
So::

    dL/dx_j = (a (1[j = t] - p_j) - b p_j (log p_j + H)) / T

It needs only the global ``lse`` and ``H`` of each row and the local logits, so the backward
(``megarl::logprob_entropy_backward``) needs no communication.

The split into ops. A process group cannot be a custom-op argument, so the public
:func:`logprob_entropy` is three steps: the stats op on this shard (no autograd), the all-reduces
(none at TP = 1), and ``megarl::logprob_entropy_finalize``, which turns the reduced statistics into
``(log_probs, entropy)``. The finalize op carries the autograd formula: its ``stats`` input is a
constant normaliser precomputed from ``logits``, and its backward returns the full derivative
above (through the normaliser too), so the graph is exact without differentiating the stats pass
or the collectives. The three steps and the finalize op's autograd are written once, for this op
and ``fused_linear_logprob_entropy``, in :mod:`megarl.kernels.common`.

Implementations. On CUDA tensors the ops run Triton kernels; elsewhere a torch implementation
(the CPU path, and the tests' second subject), in one pass when the fp32 logits fit
``TORCH_CHUNK_ELEMENTS`` and chunked over rows otherwise. ``backend="triton"`` on CPU
tensors runs the kernels under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module
is imported).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megarl.kernels.common import (
    EMPTY_ROW_MAX,
    LAUNCH_OPTIONS,
    autotune_configs,
    check_arguments,
    empty_stats,
    finalize_stats,
    grad_from_logits,
    interpreter_block_v,
    online_softmax_update,
    phase,
    register_finalize,
    rows_bucket,
    run_split_op,
    use_triton,
    valid_columns,
    vocab_range,
)

# Each fp32 temporary of the torch path holds at most 2^22 elements (16 MiB), two or three at a
# time (computed in place): a chunk's dozen torch calls cost nothing next to its 4M elements of
# work, and the working set stays small next to the logits themselves.
TORCH_CHUNK_ELEMENTS = 1 << 22


def _stats_configs() -> list[triton.Config]:
    # Memory-bound row reduction on H100: 4-8K columns per step keep enough bytes in flight per
    # SM to approach HBM bandwidth; more stages deepen the load pipeline.
    return autotune_configs([
        triton.Config({"BLOCK_V": block}, num_warps=warps, num_stages=stages)
        for block, warps, stages in (
            (2048, 4, 3), (4096, 8, 3), (4096, 8, 4), (8192, 8, 3), (8192, 16, 3), (16384, 16, 2),
        )
    ])


def _backward_configs() -> list[triton.Config]:
    # Reads and writes one block per program (no loop): large blocks amortise the per-row loads.
    return autotune_configs([
        triton.Config({"BLOCK_V": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 16))
    ])


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(
    logits_ptr, targets_ptr, stats_ptr,
    n_rows, row_stride, valid_cols, vocab_start, inv_temperature, rows_bucket,
    BLOCK_V: tl.constexpr,
):
    # rows_bucket: the autotuner's key only (one program per row: N sets the grid).
    row = tl.program_id(0)
    row_logits = logits_ptr + row.to(tl.int64) * row_stride
    row_max = tl.full((1,), EMPTY_ROW_MAX, tl.float32)
    sum_exp = tl.zeros((1,), tl.float32)
    weighted = tl.zeros((1,), tl.float32)
    for start in range(0, valid_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_logits + cols, mask=cols < valid_cols, other=float("-inf")).to(tl.float32)
        row_max, sum_exp, weighted = online_softmax_update(row_max, sum_exp, weighted, (z * inv_temperature)[None, :])
    local_target = tl.load(targets_ptr + row) - vocab_start
    owned = (local_target >= 0) & (local_target < valid_cols)
    target_logit = tl.load(row_logits + local_target, mask=owned, other=0.0).to(tl.float32) * inv_temperature
    out = stats_ptr + row + tl.arange(0, 1)
    tl.store(out, row_max)
    tl.store(out + n_rows, sum_exp)
    tl.store(out + 2 * n_rows, weighted)
    tl.store(out + 3 * n_rows, tl.where(owned, target_logit, 0.0) + tl.zeros((1,), tl.float32))


@triton.jit
def _backward_kernel(
    logits_ptr, grad_logits_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr, grad_entropy_ptr,
    n_cols, logits_row_stride, grad_row_stride, valid_cols, vocab_start, vocab_size, inv_temperature, rows_bucket,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = tl.load(
        logits_ptr + row.to(tl.int64) * logits_row_stride + cols, mask=cols < valid_cols, other=float("-inf")
    ).to(tl.float32)
    target = tl.load(targets_ptr + row + tl.arange(0, 1))
    grad_log_prob = tl.load(grad_log_prob_ptr + row + tl.arange(0, 1))
    grad_log_prob = tl.where((target >= 0) & (target < vocab_size), grad_log_prob, 0.0)
    grad = grad_from_logits(
        (z * inv_temperature)[None, :],
        cols[None, :] == (target - vocab_start)[:, None],
        tl.load(log_sum_exp_ptr + row + tl.arange(0, 1)),
        tl.load(entropy_ptr + row + tl.arange(0, 1)),
        grad_log_prob,
        tl.load(grad_entropy_ptr + row + tl.arange(0, 1)),
        inv_temperature,
    )
    out = grad_logits_ptr + row.to(tl.int64) * grad_row_stride + cols[None, :]
    tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=cols[None, :] < n_cols)


# Keyed on the shard's width and the token-count bucket (megarl.kernels.common.rows_bucket).
_stats_kernel_tuned = triton.autotune(configs=_stats_configs(), key=["valid_cols", "rows_bucket"])(_stats_kernel)
_backward_kernel_tuned = triton.autotune(configs=_backward_configs(), key=["n_cols", "rows_bucket"])(_backward_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers and the torch implementation
# ----------------------------------------------------------------------------------------------


def _stats_triton(logits, targets, vocab_start, valid_cols, temperature):
    n_rows = logits.shape[0]
    stats = torch.empty(4, n_rows, dtype=torch.float32, device=logits.device)
    args = (
        logits, targets, stats, n_rows, logits.stride(0), valid_cols, vocab_start, 1.0 / temperature, rows_bucket(n_rows)
    )
    if logits.is_cuda:
        _stats_kernel_tuned[(n_rows,)](*args, **LAUNCH_OPTIONS)
    else:
        _stats_kernel[(n_rows,)](*args, BLOCK_V=interpreter_block_v(valid_cols))
    return stats


def _row_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices of the torch path over ``n_cols`` columns, each at most ``TORCH_CHUNK_ELEMENTS``
    elements: one slice of every row when the whole ``[n_rows, n_cols]`` fits."""
    rows_per_chunk = max(1, TORCH_CHUNK_ELEMENTS // n_cols)
    return [slice(start, start + rows_per_chunk) for start in range(0, n_rows, rows_per_chunk)]


def _stats_of_rows(logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor, temperature: float):
    """Stats ``[4, R]`` of valid logits ``[R, C]`` (no padding column); ``local_targets: [R]`` index
    them where ``owned: [R]``."""
    z = logits.to(torch.float32, copy=True).mul_(1.0 / temperature)
    target_logit = z.gather(1, local_targets.clamp(0, z.shape[1] - 1).long()[:, None])[:, 0]
    row_max = z.amax(dim=1).clamp_min(EMPTY_ROW_MAX.value)
    shifted = z.sub_(row_max[:, None])
    exp_shifted = shifted.exp()
    sum_exp = exp_shifted.sum(dim=1)
    # exp underflows to 0 exactly where (z - max) may be -inf: those products (nan) count 0.
    weighted = shifted.mul_(exp_shifted).nan_to_num_(nan=0.0).sum(dim=1)
    return torch.stack((row_max, sum_exp, weighted, torch.where(owned, target_logit, 0.0)))


def partial_stats_torch(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float
) -> torch.Tensor:
    """Torch stats pass: ``logits: [N, V/TP]``, ``targets: [N]`` -> ``[4, N]`` fp32.

    One pass over all rows when their fp32 logits fit ``TORCH_CHUNK_ELEMENTS``, else row chunks.
    """
    n_rows, n_cols = logits.shape
    valid_cols = valid_columns(n_cols, vocab_start, vocab_size)
    if valid_cols == 0 or n_rows == 0:
        return empty_stats(n_rows, logits.device)
    local_targets = targets - vocab_start
    owned = (local_targets >= 0) & (local_targets < valid_cols)
    valid_logits = logits[:, :valid_cols]
    chunks = _row_chunks(n_rows, valid_cols)
    if len(chunks) == 1:
        return _stats_of_rows(valid_logits, local_targets, owned, temperature)
    stats = torch.empty(4, n_rows, dtype=torch.float32, device=logits.device)
    for rows in chunks:
        stats[:, rows] = _stats_of_rows(valid_logits[rows], local_targets[rows], owned[rows], temperature)
    return stats


def _backward_triton(logits, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy, vocab_start, vocab_size,
                     temperature):
    n_rows, n_cols = logits.shape
    grad_logits = torch.empty_like(logits)
    if n_rows == 0:
        return grad_logits
    args = (
        logits, grad_logits, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy,
        n_cols, logits.stride(0), grad_logits.stride(0), valid_columns(n_cols, vocab_start, vocab_size),
        vocab_start, vocab_size, 1.0 / temperature, rows_bucket(n_rows),
    )
    if logits.is_cuda:
        _backward_kernel_tuned[lambda meta: (n_rows, triton.cdiv(n_cols, meta["BLOCK_V"]))](*args, **LAUNCH_OPTIONS)
    else:
        block = interpreter_block_v(n_cols)
        _backward_kernel[(n_rows, triton.cdiv(n_cols, block))](*args, BLOCK_V=block)
    return grad_logits


def _grad_of_rows(
    logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor, log_sum_exp: torch.Tensor,
    entropy: torch.Tensor, grad_log_prob: torch.Tensor, grad_entropy: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """fp32 ``dL/dlogits: [R, C]`` of valid logits ``[R, C]``, from row vectors ``[R]`` (``grad_log_prob``
    already 0 for ignored targets)."""
    log_p = logits.to(torch.float32, copy=True)
    log_p.mul_(1.0 / temperature).sub_(log_sum_exp[:, None])
    p = log_p.exp()
    # -p (a + b (log p + H)), in place; p is 0 exactly where log p may be -inf (nan -> 0).
    grad = log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad_log_prob[:, None])
    grad.mul_(p).neg_().nan_to_num_(nan=0.0)
    target_cols = local_targets.clamp(0, grad.shape[1] - 1).long()[:, None]
    grad.scatter_add_(1, target_cols, torch.where(owned, grad_log_prob, 0.0)[:, None])
    return grad.mul_(1.0 / temperature)


def grad_logits_torch(
    logits: torch.Tensor, targets: torch.Tensor, log_sum_exp: torch.Tensor, entropy: torch.Tensor,
    grad_log_prob: torch.Tensor, grad_entropy: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float,
) -> torch.Tensor:
    """Torch backward: ``dL/dlogits: [N, V/TP]`` in ``logits.dtype`` (padding 0).

    One pass over all rows when their fp32 logits fit ``TORCH_CHUNK_ELEMENTS``, else row chunks.
    """
    n_rows, n_cols = logits.shape
    valid_cols = valid_columns(n_cols, vocab_start, vocab_size)
    if valid_cols == 0 or n_rows == 0:
        return torch.zeros_like(logits)
    grad_log_prob = torch.where((targets >= 0) & (targets < vocab_size), grad_log_prob, 0.0)
    local_targets = targets - vocab_start
    owned = (local_targets >= 0) & (local_targets < valid_cols)
    row_values = (local_targets, owned, log_sum_exp, entropy, grad_log_prob, grad_entropy)
    chunks = _row_chunks(n_rows, valid_cols)
    if len(chunks) == 1 and valid_cols == n_cols:
        return _grad_of_rows(logits, *row_values, temperature).to(logits.dtype)
    grad_logits = torch.zeros_like(logits)
    for rows in chunks:
        grad_logits[rows, :valid_cols] = _grad_of_rows(
            logits[rows, :valid_cols], *(values[rows] for values in row_values), temperature
        )
    return grad_logits


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("megarl::logprob_entropy_stats", mutates_args=())
def logprob_entropy_stats(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float, backend: str
) -> torch.Tensor:
    """Stats pass on one shard: ``logits: [N, V/TP]``, ``targets: [N]`` (global ids) -> ``[4, N]`` fp32.

    Rows: running max ``m``, ``sum exp(z - m)``, ``sum exp(z - m)(z - m)``, the target's ``z`` if owned.
    """
    with phase("stats", logits.device):
        if not use_triton(logits, backend):
            return partial_stats_torch(logits, targets, vocab_start, vocab_size, temperature)
        valid_cols = valid_columns(logits.shape[1], vocab_start, vocab_size)
        if valid_cols == 0 or logits.shape[0] == 0:
            return empty_stats(logits.shape[0], logits.device)
        return _stats_triton(logits, targets, vocab_start, valid_cols, temperature)


@logprob_entropy_stats.register_fake
def _(logits, targets, vocab_start, vocab_size, temperature, backend):
    return logits.new_empty((4, logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("megarl::logprob_entropy_backward", mutates_args=())
def logprob_entropy_backward(
    logits: torch.Tensor, targets: torch.Tensor, log_sum_exp: torch.Tensor, entropy: torch.Tensor,
    grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor,
    vocab_start: int, vocab_size: int, temperature: float, backend: str,
) -> torch.Tensor:
    """``dL/dlogits: [N, V/TP]`` (``logits.dtype``) from the reduced ``log_sum_exp``/``entropy: [N]``
    and the upstream ``grad_log_probs``/``grad_entropy: [N]``; padded columns get 0."""
    with phase("grad-logits", logits.device):
        if not use_triton(logits, backend):
            return grad_logits_torch(
                logits, targets, log_sum_exp, entropy, grad_log_probs, grad_entropy, vocab_start, vocab_size,
                temperature,
            )
        return _backward_triton(
            logits, targets, log_sum_exp, entropy, grad_log_probs.contiguous(), grad_entropy.contiguous(),
            vocab_start, vocab_size, temperature,
        )


@logprob_entropy_backward.register_fake
def _(logits, targets, log_sum_exp, entropy, grad_log_probs, grad_entropy, vocab_start, vocab_size, temperature,
      backend):
    return torch.empty_like(logits)


@torch.library.custom_op("megarl::logprob_entropy_finalize", mutates_args=())
def logprob_entropy_finalize(
    logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
    vocab_start: int, vocab_size: int, temperature: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced ``stats: [4, N]`` of ``logits: [N, V/TP]`` -> ``(log_probs [N], entropy [N])`` fp32.

    Differentiable in ``logits`` (the full derivative, ``stats`` being their normaliser).
    """
    log_probs, entropy, _ = finalize_stats(stats, targets, vocab_size)
    return log_probs, entropy


register_finalize(logprob_entropy_finalize, torch.ops.megarl.logprob_entropy_backward)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and the entropy of each row's distribution.

    Args:
        logits: ``[..., V/TP]``, this rank's contiguous vocabulary shard (rank ``r`` of ``group``
            holds columns ``[r * V/TP, (r + 1) * V/TP)``), any float dtype.
        targets: ``[...]`` global token ids; ids outside ``[0, vocab_size)`` (padding) give
            log-prob 0 and no log-prob gradient.
        temperature: the logits are divided by it (> 0).
        vocab_size: the real vocabulary; columns at or past it (Megatron's padding) are ignored.
            Defaults to ``V/TP x TP``.
        group: the tensor-parallel group the vocabulary is split over; ``None`` (or one rank)
            communicates nothing.
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(log_probs, entropy)``, both ``[...]`` fp32, differentiable with respect to ``logits``.
    """
    check_arguments(backend, temperature, targets, logits, "logits", "the vocab")
    vocab_start, vocab_size = vocab_range(logits.shape[-1], vocab_size, group)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    return run_split_op(
        torch.ops.megarl.logprob_entropy_stats, torch.ops.megarl.logprob_entropy_finalize, (flat_logits,), targets,
        vocab_start=vocab_start, vocab_size=vocab_size, temperature=temperature, backend=backend, group=group,
    )
