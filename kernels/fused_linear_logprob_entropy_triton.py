"""The Triton side of :mod:`megarl.kernels.fused_linear_logprob_entropy`: its kernels and their launchers.

Stats pass (``megarl::fused_linear_logprob_entropy_stats``). One Triton kernel: each program owns
``BLOCK_N`` rows and one split (a range of the shard's columns), computes each logits tile
``[BLOCK_N, BLOCK_V]`` with ``tl.dot`` over ``H`` (bf16 operands, fp32 accumulation) and folds it
into the rows' online statistics. The splits' partial statistics ``[S, 4, N]`` (a few MiB) are
combined in torch; the ranks' statistics are then all-reduced as in ``logprob_entropy``.

Grad pass (``megarl::fused_linear_logprob_entropy_backward``), chunk by chunk of ``C`` vocabulary
columns, ``C`` chosen so that a chunk of logit gradients fills a fixed workspace
(``GRAD_WORKSPACE_BYTES``):

1. a Triton kernel recomputes the chunk's logits tile by tile and writes ``G = dL/dlogits: [N, C]``
   in the input dtype;
2. ``dW[chunk] = G^T @ hidden`` with cuBLAS, complete in one product (nothing accumulates over
   chunks, so ``dW`` is rounded to bf16 once);
3. ``dX += G @ W[chunk]``, a Triton GEMM accumulating into an fp32 ``[N, H]`` buffer.

Why not one kernel that adds every program's ``dX`` and ``dW`` tiles with fp32 atomics: that
needs an fp32 ``[V/TP, H]`` buffer for ``dW`` (2.5 GB at V = 152k, H = 4096), makes the result
depend on scheduling, and contends on the same rows; the two
products above run at GEMM speed, are deterministic, and cost one extra read and write of ``G``
(``N x C x 2`` bytes, small next to the ``2 N C H`` FLOPs of each product).

Memory beyond the inputs, the outputs and the gradients: the fp32 ``dX`` accumulator
(``N x H x 4`` bytes = ``2 x N x H x 2``) plus a fixed workspace: one chunk of ``G`` (at most
``GRAD_WORKSPACE_BYTES``, or ``N x COLUMN_ALIGN x 2`` bytes past half a million rows) and the split
statistics. Work: forward ``2 N H V`` FLOPs; backward ``6 N H V`` (the logits recomputed, ``dX``,
``dW``).

CPU tensors reach these kernels only under Triton's interpreter (``backend="triton"`` with
``TRITON_INTERPRET=1``), in the small blocks of the ``INTERPRETER_*`` constants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megarl.kernels.common import (
    EMPTY_ROW_MAX,
    LAUNCH_OPTIONS,
    combine_partial_stats,
    grad_from_logits,
    interpreter_block_v,
    online_softmax_update,
    valid_columns,
)

# Rows per program in every GPU configuration of the stats kernel: the number of vocabulary
# splits is fixed before the autotuner picks a configuration, from the number of row blocks.
STATS_BLOCK_N = 128

# The largest BLOCK_V of any configuration: vocabulary splits and grad chunks start on multiples
# of it, so that only the last tile of a split or chunk is ragged.
COLUMN_ALIGN = 256

# Programs per SM the stats pass aims for (row blocks x splits): with 16 waves the last, partial
# wave idles about 1/32 of the run on average.
TARGET_WAVES = 16

# Row blocks that run next to each other over the same columns: their weight tiles are read from
# HBM once and then from L2 (16 x 128 rows x H x 2 bytes of hidden stay resident too).
GROUP_ROWS = 16

# The chunk of logit gradients G of the GPU grad pass holds at most this many bytes: 256 MiB is
# 8192 columns at N = 16384 in bf16, so the fp32 dX accumulator is read and written V / 8192 = 19
# times (10 GB at H = 4096: by estimate 4 % of the backward's time on an H100), while the chunk
# stays a workspace of fixed size whatever N (below half a million rows).
GRAD_WORKSPACE_BYTES = 256 << 20

# CPU tensors reach the kernels only under Triton's interpreter (see megarl.kernels.common for why
# its blocks differ): 16-row, 16-deep tiles over the interpreter's column block, grouped by 2 row
# blocks, with splits and grad chunks of 2 column blocks, so that the tests' shapes (37 rows,
# H = 40, 1000 columns) exercise ragged row, K and column tails, a ragged last group, several
# splits and several grad chunks.
INTERPRETER_BLOCK_N = 16
INTERPRETER_BLOCK_K = 16
INTERPRETER_GROUP_ROWS = 2
INTERPRETER_BLOCKS_PER_CHUNK = 2


def _logits_tile_configs() -> list[triton.Config]:
    # H100 bf16 wgmma tiles: 128 x 256 x 64 with 8 warps (two warpgroups) is the usual best;
    # 128 x 128 leaves registers for the softmax epilogue; 3-4 stages of 48-64 KiB fit in SMEM.
    return [
        triton.Config({"BLOCK_N": STATS_BLOCK_N, "BLOCK_V": cols, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
        for cols, warps, stages in ((256, 8, 3), (256, 8, 4), (128, 8, 4), (128, 4, 4))
    ]


def _accumulate_configs() -> list[triton.Config]:
    # A plain GEMM epilogue (load, add, store fp32): the largest tiles whose fp32 accumulator
    # still fits two warpgroups' registers.
    return [
        triton.Config({"BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
        for rows, cols, warps, stages in (
            (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4),
        )
    ]


def _even_k(size_key: str):
    return triton.heuristics({"EVEN_K": lambda args: args[size_key] % args["BLOCK_K"] == 0})


def _dot_options(tensor: torch.Tensor) -> dict:
    """Compile-time flags of every ``tl.dot`` on ``tensor``'s dtype and device.

    Triton 3.9's interpreter multiplies bfloat16 operands as their raw 16-bit patterns (it stores
    bf16 as uint16 and calls ``np.matmul`` on them), so on CPU tensors the operands are upcast to
    fp32 first: exact, bf16 -> fp32 is lossless and the products fit fp32. fp32 inputs use TF32
    only where torch's matmuls would (``torch.backends.cuda.matmul.allow_tf32``).
    """
    tf32 = tensor.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": not tensor.is_cuda, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped_block(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """``(row block, column block)`` of program ``pid`` in grouped order: ``GROUP`` consecutive row
    blocks sweep the column blocks together, so that each column tile is read from HBM once and
    then from L2."""
    programs_per_group = GROUP * n_col_blocks
    first_row_block = (pid // programs_per_group) * GROUP
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP)
    row_block = first_row_block + (pid % programs_per_group) % group_rows
    return row_block, (pid % programs_per_group) // group_rows


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, hidden_size, hidden_stride, weight_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``hidden[rows] @ weight[cols].T`` as fp32 ``[BLOCK_N, BLOCK_V]``; ``rows``/``cols`` in bounds."""
    offs_k = tl.arange(0, BLOCK_K)
    hidden_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_stride + offs_k[None, :]
    weight_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * weight_stride + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            x = tl.load(hidden_ptrs)
            w = tl.load(weight_ptrs)
        else:
            in_k = offs_k[None, :] < hidden_size - k
            x = tl.load(hidden_ptrs, mask=in_k, other=0.0)
            w = tl.load(weight_ptrs, mask=in_k, other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        hidden_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K
    return acc


@_even_k("hidden_size")
@triton.jit
def _stats_kernel(
    hidden_ptr, weight_ptr, targets_ptr, partial_ptr,
    n_rows, hidden_size, valid_cols, cols_per_split, num_splits, vocab_start, inv_temperature,
    hidden_stride, weight_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row_block, split = _grouped_block(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), num_splits, GROUP_N)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    local_targets = tl.load(targets_ptr + rows, mask=in_rows, other=-1) - vocab_start
    row_max = tl.full((BLOCK_N,), EMPTY_ROW_MAX, tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    weighted = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    split_start = split * cols_per_split
    split_end = tl.minimum(split_start + cols_per_split, valid_cols)
    for start in range(split_start, split_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_split = cols[None, :] < split_end
        # Out-of-range rows and columns load wrapped (valid) addresses and are masked below.
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows % n_rows, cols % valid_cols, hidden_size, hidden_stride, weight_stride,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, INPUT_PRECISION,
        ) * inv_temperature
        z = tl.where(in_split, z, float("-inf"))
        row_max, sum_exp, weighted = online_softmax_update(row_max, sum_exp, weighted, z)
        is_target = (cols[None, :] == local_targets[:, None]) & in_split
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    out = partial_ptr + split.to(tl.int64) * 4 * n_rows + rows
    tl.store(out, row_max, mask=in_rows)
    tl.store(out + n_rows, sum_exp, mask=in_rows)
    tl.store(out + 2 * n_rows, weighted, mask=in_rows)
    tl.store(out + 3 * n_rows, target_logit, mask=in_rows)


@_even_k("hidden_size")
@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr, grad_entropy_ptr,
    grad_logits_ptr,
    n_rows, hidden_size, chunk_start, chunk_cols, vocab_start, vocab_size, inv_temperature,
    hidden_stride, weight_stride, grad_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # weight_ptr points at the chunk's first row; grad_logits is [N, chunk_cols] (row stride grad_stride).
    row_block, col_block = _grouped_block(
        tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(chunk_cols, BLOCK_V), GROUP_N
    )
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = rows < n_rows
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows % n_rows, cols % chunk_cols, hidden_size, hidden_stride, weight_stride,
        BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, INPUT_PRECISION,
    ) * inv_temperature
    targets = tl.load(targets_ptr + rows, mask=in_rows, other=-1)
    grad_log_prob = tl.load(grad_log_prob_ptr + rows, mask=in_rows, other=0.0)
    grad_log_prob = tl.where((targets >= 0) & (targets < vocab_size), grad_log_prob, 0.0)
    grad = grad_from_logits(
        z,
        (chunk_start + cols)[None, :] == (targets - vocab_start)[:, None],
        tl.load(log_sum_exp_ptr + rows, mask=in_rows, other=0.0),
        tl.load(entropy_ptr + rows, mask=in_rows, other=0.0),
        grad_log_prob,
        tl.load(grad_entropy_ptr + rows, mask=in_rows, other=0.0),
        inv_temperature,
    )
    out = grad_logits_ptr + rows.to(tl.int64)[:, None] * grad_stride + cols[None, :]
    tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_rows[:, None] & (cols[None, :] < chunk_cols))


@_even_k("inner")
@triton.jit
def _matmul_accumulate_kernel(
    a_ptr, b_ptr, acc_ptr, n_rows, n_out, inner, a_stride, b_stride, acc_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc [M, N] (fp32) += a [M, K] @ b [K, N]`` (both row-major with the given row strides)."""
    row_block, out_block = _grouped_block(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_out, BLOCK_N), GROUP_M)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = out_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % n_rows).to(tl.int64)[:, None] * a_stride + offs_k[None, :]
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * b_stride + (outs % n_out)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, inner, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < inner - k, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < inner - k, other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * b_stride
    out = acc_ptr + rows.to(tl.int64)[:, None] * acc_stride + outs[None, :]
    in_bounds = (rows[:, None] < n_rows) & (outs[None, :] < n_out)
    tl.store(out, acc + tl.load(out, mask=in_bounds, other=0.0), mask=in_bounds)


# Autotuning is keyed on the hidden size only: N changes with every packed micro-batch, and with
# it the splits and the grad chunk's width (the accumulate GEMM's depth); re-tuning for each would
# stall training.
_stats_kernel_tuned = triton.autotune(configs=_logits_tile_configs(), key=["hidden_size"])(_stats_kernel)
_grad_logits_kernel_tuned = triton.autotune(configs=_logits_tile_configs(), key=["hidden_size"])(_grad_logits_kernel)
# Timing runs the kernel repeatedly: restore the accumulator it adds into after each.
_matmul_accumulate_kernel_tuned = triton.autotune(
    configs=_accumulate_configs(), key=["n_out"], restore_value=["acc_ptr"]
)(_matmul_accumulate_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _cols_per_split(n_rows: int, valid_cols: int, device: torch.device) -> int:
    """Columns per split so that row blocks x splits fill ``TARGET_WAVES`` waves of the GPU."""
    row_blocks = triton.cdiv(n_rows, STATS_BLOCK_N)
    programs = TARGET_WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(valid_cols, COLUMN_ALIGN), triton.cdiv(programs, row_blocks)))
    return triton.cdiv(triton.cdiv(valid_cols, splits), COLUMN_ALIGN) * COLUMN_ALIGN


def stats_triton(hidden, weight, targets, vocab_start, valid_cols, temperature):
    """Stats pass: ``hidden: [N, H]`` (N > 0), the shard ``weight: [V/TP, H]`` of which the first
    ``valid_cols`` (> 0) rows are vocabulary, ``targets: [N]`` -> ``[4, N]`` fp32."""
    n_rows, hidden_size = hidden.shape
    if hidden.is_cuda:
        cols_per_split = _cols_per_split(n_rows, valid_cols, hidden.device)
        kernel, block_n, launch_options = _stats_kernel_tuned, STATS_BLOCK_N, {"GROUP_N": GROUP_ROWS, **LAUNCH_OPTIONS}
    else:
        block_v = interpreter_block_v(valid_cols)
        cols_per_split = INTERPRETER_BLOCKS_PER_CHUNK * block_v
        kernel, block_n = _stats_kernel, INTERPRETER_BLOCK_N
        launch_options = {
            "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_V": block_v, "BLOCK_K": INTERPRETER_BLOCK_K,
            "GROUP_N": INTERPRETER_GROUP_ROWS,
        }
    num_splits = triton.cdiv(valid_cols, cols_per_split)
    partial = torch.empty(num_splits, 4, n_rows, dtype=torch.float32, device=hidden.device)
    kernel[(triton.cdiv(n_rows, block_n) * num_splits,)](
        hidden, weight, targets, partial,
        n_rows, hidden_size, valid_cols, cols_per_split, num_splits, vocab_start, 1.0 / temperature,
        hidden.stride(0), weight.stride(0),
        **launch_options, **_dot_options(hidden),
    )
    return combine_partial_stats(partial)


def grad_chunk_columns(n_rows: int, valid_cols: int, element_size: int) -> int:
    """Vocabulary columns per chunk of the GPU grad pass: as many as ``GRAD_WORKSPACE_BYTES`` hold
    for ``n_rows`` rows, a multiple of ``COLUMN_ALIGN``, at least one alignment, at most the shard."""
    columns = GRAD_WORKSPACE_BYTES // (n_rows * element_size) // COLUMN_ALIGN * COLUMN_ALIGN
    return min(max(COLUMN_ALIGN, columns), valid_cols)


def backward_triton(hidden, weight, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy,
                    vocab_start, vocab_size, temperature):
    """Grad pass: ``(dL/dhidden [N, H], dL/dweight [V/TP, H])`` in the inputs' dtype, from the
    reduced ``log_sum_exp``/``entropy: [N]`` and the upstream gradients ``[N]`` (contiguous)."""
    n_rows, hidden_size = hidden.shape
    valid_cols = valid_columns(weight.shape[0], vocab_start, vocab_size)
    if valid_cols == 0 or n_rows == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight)
    grad_weight = torch.empty_like(weight)
    grad_weight[valid_cols:].zero_()
    grad_hidden = torch.zeros(n_rows, hidden_size, dtype=torch.float32, device=hidden.device)
    if hidden.is_cuda:
        chunk = grad_chunk_columns(n_rows, valid_cols, hidden.element_size())
        grad_kernel, accumulate_kernel = _grad_logits_kernel_tuned, _matmul_accumulate_kernel_tuned
        grad_options, accumulate_options = {"GROUP_N": GROUP_ROWS, **LAUNCH_OPTIONS}, {"GROUP_M": GROUP_ROWS}
    else:
        block_v = interpreter_block_v(valid_cols)
        chunk = min(INTERPRETER_BLOCKS_PER_CHUNK * block_v, valid_cols)
        grad_kernel, accumulate_kernel = _grad_logits_kernel, _matmul_accumulate_kernel
        grad_options = {
            "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_V": block_v, "BLOCK_K": INTERPRETER_BLOCK_K,
            "GROUP_N": INTERPRETER_GROUP_ROWS,
        }
        # A quarter of a column block deep: few interpreted iterations, a ragged tail on a ragged chunk.
        accumulate_options = {
            "BLOCK_M": INTERPRETER_BLOCK_N, "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_K": block_v // 4,
            "GROUP_M": INTERPRETER_GROUP_ROWS,
        }
    grad_logits = torch.empty(n_rows, chunk, dtype=hidden.dtype, device=hidden.device)
    dot_options = _dot_options(hidden)

    def grad_grid(chunk_cols):
        return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(chunk_cols, meta["BLOCK_V"]),)

    def accumulate_grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(hidden_size, meta["BLOCK_N"]),)

    for chunk_start in range(0, valid_cols, chunk):
        chunk_cols = min(chunk, valid_cols - chunk_start)
        weight_chunk = weight[chunk_start:chunk_start + chunk_cols]
        grad_kernel[grad_grid(chunk_cols)](
            hidden, weight_chunk, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy, grad_logits,
            n_rows, hidden_size, chunk_start, chunk_cols, vocab_start, vocab_size, 1.0 / temperature,
            hidden.stride(0), weight.stride(0), grad_logits.stride(0),
            **grad_options, **dot_options,
        )
        chunk_grad = grad_logits[:, :chunk_cols]
        torch.mm(chunk_grad.t(), hidden, out=grad_weight[chunk_start:chunk_start + chunk_cols])
        accumulate_kernel[accumulate_grid](
            chunk_grad, weight_chunk, grad_hidden, n_rows, hidden_size, chunk_cols,
            grad_logits.stride(0), weight.stride(0), grad_hidden.stride(0),
            **accumulate_options, **dot_options,
        )
    return grad_hidden.to(hidden.dtype), grad_weight
