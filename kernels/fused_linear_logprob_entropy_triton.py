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
3. ``dX += G @ W[chunk]`` into an fp32 ``[N, H]`` buffer: cuBLAS through torch's fp32-result
   matmul by default, a Triton GEMM as the fallback (``MEGARL_FUSED_DX``,
   :mod:`megarl.kernels.matmul_accumulate`).

Steps 2 and 3 run only for the inputs that need a gradient (a frozen output weight skips every
``dW`` product, hidden states without gradient every ``dX`` one); with neither, nothing runs.

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

Variants and autotuning. Both kernels compute their logits tiles with ``tl.dot`` on operands
loaded either through pointer arithmetic and ``cp.async`` pipelines or, in the ``USE_TMA``
configurations, through TMA descriptors built on the device (``tl.make_tensor_descriptor``: bulk
copies, zero fill past the ends, no address registers); the grad kernel also has ``PERSISTENT``
configurations (one program per SM looping over the chunk's tiles). All are autotuning candidates
(``MEGARL_AUTOTUNE=first`` keeps each list's first, pointer-based, non-persistent one), keyed on
the hidden size and the token-count bucket (:func:`megarl.kernels.common.rows_bucket`), TMA ones
pruned where the operands are not 16-byte aligned. Targets are int32 in the kernels. Compiled
offline for sm_90 with Triton 3.6.0 (the GPU machine's; ``tests/kernels/compile_for_h100.py
--all-configs``), ``ptxas -v`` reports: stats kernel 128 x 256 tiles, 8 warps, 255 registers and
no spills with 3 or 4 stages (with TMA too), 128 x 128 on 8 warps 199-203 registers, on 4 warps
204 / 188 bytes of spill stores / loads; grad kernel no spills in any configuration but the
persistent pointer-based 128 x 256 (24 bytes; its TMA twin has none), 127 registers for 128 x 128
on 8 warps; the Triton accumulate kernel spills 96-176 bytes in its 128 x 256 and 256 x 128 tiles
and 132 on 4 warps (none at 128 x 128 on 8 warps), one more reason ``dX`` goes to cuBLAS by
default. Shared memory: 128-192 KiB (3-4 stages), within the H100's 227 KiB.

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
    autotune_configs,
    combine_partial_stats,
    grad_from_logits,
    grouped_block,
    interpreter_block_v,
    online_softmax_update,
    phase,
    rows_bucket,
    valid_columns,
)
from megarl.kernels.matmul_accumulate import accumulate_product

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
# The interpreter's variant of the kernels (tests switch it to TMA descriptors and persistent
# programs), and how many persistent programs it launches: fewer than the tests' tiles, so that
# each program loops over several.
INTERPRETER_VARIANT = {"USE_TMA": False, "PERSISTENT": False}
INTERPRETER_PROGRAMS = 3


def _stats_configs() -> list[triton.Config]:
    # H100 bf16 wgmma tiles: 128 x 256 x 64 with 8 warps (two warpgroups) is the usual best;
    # 128 x 128 leaves registers for the softmax epilogue; 3-4 stages of 48-64 KiB fit in SMEM.
    # Then the same tiles fed by TMA descriptors (tensor-memory-accelerator bulk copies instead of
    # cp.async: no address arithmetic in registers, out-of-bounds rows zero-filled), for one GPU run
    # to compare.
    return autotune_configs([
        triton.Config({"BLOCK_N": STATS_BLOCK_N, "BLOCK_V": cols, "BLOCK_K": 64, "USE_TMA": tma},
                      num_warps=warps, num_stages=stages)
        for cols, warps, stages, tma in (
            (256, 8, 3, False), (256, 8, 4, False), (128, 8, 4, False), (128, 4, 4, False),
            (256, 8, 3, True), (128, 8, 4, True),
        )
    ])


def _grad_configs() -> list[triton.Config]:
    # The stats pass's tiles (one tile per program, the grid's waves scheduled by the hardware),
    # then the same with TMA loads, then persistent programs (one per SM, each looping over tiles,
    # so one tile's epilogue and store overlap the next tile's first loads), with and without TMA.
    return autotune_configs([
        triton.Config({"BLOCK_N": 128, "BLOCK_V": cols, "BLOCK_K": 64, "USE_TMA": tma, "PERSISTENT": persistent},
                      num_warps=warps, num_stages=stages)
        for cols, warps, stages, tma, persistent in (
            (256, 8, 3, False, False), (256, 8, 4, False, False), (128, 8, 4, False, False), (128, 4, 4, False, False),
            (256, 8, 3, True, False), (128, 8, 4, True, False),
            (256, 8, 3, False, True), (256, 8, 3, True, True), (128, 8, 4, True, True),
        )
    ])


def _even_k(size_key: str):
    return triton.heuristics({"EVEN_K": lambda args: args[size_key] % args["BLOCK_K"] == 0})


def _without_unaligned_tma(configs, named_args, **kwargs):
    """The autotuners' pruning: TMA configurations only where the launcher found the operands
    16-byte aligned (TMA's requirement on the base address and the row stride)."""
    return configs if named_args["tma_aligned"] else [config for config in configs if not config.kwargs["USE_TMA"]]


def _dot_options(tensor: torch.Tensor) -> dict:
    """Compile-time flags of every ``tl.dot`` on ``tensor``'s dtype and device.

    Triton 3.9's interpreter multiplies bfloat16 operands as their raw 16-bit patterns (it stores
    bf16 as uint16 and calls ``np.matmul`` on them), so on CPU tensors the operands are upcast to
    fp32 first: exact, bf16 -> fp32 is lossless and the products fit fp32. fp32 inputs use TF32
    only where torch's matmuls would (``torch.backends.cuda.matmul.allow_tf32``).
    """
    tf32 = tensor.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": not tensor.is_cuda, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every 2-D ``tensor`` starts on 16 bytes and its rows are 16-byte multiples apart."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


_ALLOCATOR_SET = False


def _tma_scratch(size: int, alignment: int, stream):
    """Global memory for the TMA descriptors the kernels build on the device (Triton asks for it)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton the allocator its device-side TMA descriptors need (once, on the first CUDA launch)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(_tma_scratch)
        _ALLOCATOR_SET = True


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, row_start, col_start, n_rows, n_cols, hidden_size, hidden_stride, weight_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``hidden[rows] @ weight[cols].T`` as fp32 ``[BLOCK_N, BLOCK_V]`` for the tile at
    ``(row_start, col_start)`` of ``hidden: [n_rows, H]`` and ``weight: [n_cols, H]``; rows and
    columns past the ends hold garbage (wrapped addresses, or TMA's zero fill) for the caller to mask."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if USE_TMA:
        hidden_desc = tl.make_tensor_descriptor(
            hidden_ptr, shape=[n_rows, hidden_size], strides=[hidden_stride, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
        weight_desc = tl.make_tensor_descriptor(
            weight_ptr, shape=[n_cols, hidden_size], strides=[weight_stride, 1], block_shape=[BLOCK_V, BLOCK_K]
        )
        for k in range(0, hidden_size, BLOCK_K):
            x = hidden_desc.load([row_start, k])
            w = weight_desc.load([col_start, k])
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        rows = (row_start + tl.arange(0, BLOCK_N)) % n_rows
        cols = (col_start + tl.arange(0, BLOCK_V)) % n_cols
        hidden_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_stride + offs_k[None, :]
        weight_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * weight_stride + offs_k[None, :]
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
    hidden_stride, weight_stride, rows_bucket, tma_aligned,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # rows_bucket and tma_aligned: the autotuner's key and pruning only.
    row_block, split = grouped_block(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), num_splits, GROUP_N)
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
        z = _logits_tile(
            hidden_ptr, weight_ptr, row_block * BLOCK_N, start, n_rows, valid_cols, hidden_size, hidden_stride,
            weight_stride, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, USE_TMA, UPCAST_DOT, INPUT_PRECISION,
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


@triton.jit
def _grad_logits_tile(
    tile, hidden_ptr, weight_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr, grad_entropy_ptr,
    grad_logits_ptr, n_rows, hidden_size, chunk_start, chunk_cols, vocab_start, vocab_size, inv_temperature,
    hidden_stride, weight_stride, grad_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Write ``G = dL/dlogits`` of tile number ``tile`` (grouped order) of the chunk."""
    row_block, col_block = grouped_block(tile, tl.cdiv(n_rows, BLOCK_N), tl.cdiv(chunk_cols, BLOCK_V), GROUP_N)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = rows < n_rows
    z = _logits_tile(
        hidden_ptr, weight_ptr, row_block * BLOCK_N, col_block * BLOCK_V, n_rows, chunk_cols, hidden_size,
        hidden_stride, weight_stride, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, USE_TMA, UPCAST_DOT, INPUT_PRECISION,
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


@_even_k("hidden_size")
@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr, grad_entropy_ptr,
    grad_logits_ptr,
    n_rows, hidden_size, chunk_start, chunk_cols, vocab_start, vocab_size, inv_temperature,
    hidden_stride, weight_stride, grad_stride, rows_bucket, tma_aligned,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # weight_ptr points at the chunk's first row; grad_logits is [N, chunk_cols] (row stride grad_stride).
    # rows_bucket and tma_aligned: the autotuner's key and pruning only.
    n_tiles = tl.cdiv(n_rows, BLOCK_N) * tl.cdiv(chunk_cols, BLOCK_V)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _grad_logits_tile(
                tile, hidden_ptr, weight_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr,
                grad_entropy_ptr, grad_logits_ptr, n_rows, hidden_size, chunk_start, chunk_cols, vocab_start,
                vocab_size, inv_temperature, hidden_stride, weight_stride, grad_stride,
                BLOCK_N, BLOCK_V, BLOCK_K, GROUP_N, EVEN_K, USE_TMA, UPCAST_DOT, INPUT_PRECISION,
            )
    else:
        _grad_logits_tile(
            tl.program_id(0), hidden_ptr, weight_ptr, targets_ptr, log_sum_exp_ptr, entropy_ptr, grad_log_prob_ptr,
            grad_entropy_ptr, grad_logits_ptr, n_rows, hidden_size, chunk_start, chunk_cols, vocab_start,
            vocab_size, inv_temperature, hidden_stride, weight_stride, grad_stride,
            BLOCK_N, BLOCK_V, BLOCK_K, GROUP_N, EVEN_K, USE_TMA, UPCAST_DOT, INPUT_PRECISION,
        )


# Autotuning is keyed on the hidden size and the token-count bucket (megarl.kernels.common.rows_bucket):
# N changes with every packed micro-batch, and with it the splits and the grad chunk's width;
# re-tuning for each exact N would stall training. tma_aligned is in the key because it prunes.
_stats_kernel_tuned = triton.autotune(
    configs=_stats_configs(), key=["hidden_size", "rows_bucket", "tma_aligned"],
    prune_configs_by={"early_config_prune": _without_unaligned_tma},
)(_stats_kernel)
_grad_logits_kernel_tuned = triton.autotune(
    configs=_grad_configs(), key=["hidden_size", "rows_bucket", "tma_aligned"],
    prune_configs_by={"early_config_prune": _without_unaligned_tma},
)(_grad_logits_kernel)


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
        _ensure_allocator()
        cols_per_split = _cols_per_split(n_rows, valid_cols, hidden.device)
        kernel, block_n, launch_options = _stats_kernel_tuned, STATS_BLOCK_N, {"GROUP_N": GROUP_ROWS, **LAUNCH_OPTIONS}
    else:
        block_v = interpreter_block_v(valid_cols)
        cols_per_split = INTERPRETER_BLOCKS_PER_CHUNK * block_v
        kernel, block_n = _stats_kernel, INTERPRETER_BLOCK_N
        launch_options = {
            "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_V": block_v, "BLOCK_K": INTERPRETER_BLOCK_K,
            "GROUP_N": INTERPRETER_GROUP_ROWS, "USE_TMA": INTERPRETER_VARIANT["USE_TMA"],
        }
    num_splits = triton.cdiv(valid_cols, cols_per_split)
    partial = torch.empty(num_splits, 4, n_rows, dtype=torch.float32, device=hidden.device)
    kernel[(triton.cdiv(n_rows, block_n) * num_splits,)](
        hidden, weight, targets, partial,
        n_rows, hidden_size, valid_cols, cols_per_split, num_splits, vocab_start, 1.0 / temperature,
        hidden.stride(0), weight.stride(0), rows_bucket(n_rows), int(_tma_aligned(hidden, weight)),
        **launch_options, **_dot_options(hidden),
    )
    return combine_partial_stats(partial)


def grad_chunk_columns(n_rows: int, valid_cols: int, element_size: int) -> int:
    """Vocabulary columns per chunk of the GPU grad pass: as many as ``GRAD_WORKSPACE_BYTES`` hold
    for ``n_rows`` rows, a multiple of ``COLUMN_ALIGN``, at least one alignment, at most the shard."""
    columns = GRAD_WORKSPACE_BYTES // (n_rows * element_size) // COLUMN_ALIGN * COLUMN_ALIGN
    return min(max(COLUMN_ALIGN, columns), valid_cols)


def _grad_grid(n_rows: int, chunk_cols: int, programs: int):
    """The grad kernel's grid: a program per tile, or at most ``programs`` persistent ones."""

    def grid(meta):
        tiles = triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(chunk_cols, meta["BLOCK_V"])
        return (min(tiles, programs) if meta["PERSISTENT"] else tiles,)

    return grid


def backward_triton(hidden, weight, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy,
                    vocab_start, vocab_size, temperature, need_grad_hidden=True, need_grad_weight=True):
    """Grad pass: ``(dL/dhidden [N, H], dL/dweight [V/TP, H])`` in the inputs' dtype, from the
    reduced ``log_sum_exp``/``entropy: [N]`` and the upstream gradients ``[N]`` (contiguous); a
    gradient not needed is not computed and comes back as an empty tensor."""
    n_rows, hidden_size = hidden.shape
    valid_cols = valid_columns(weight.shape[0], vocab_start, vocab_size)
    if valid_cols == 0 or n_rows == 0 or not (need_grad_hidden or need_grad_weight):
        return (torch.zeros_like(hidden) if need_grad_hidden else hidden.new_empty(0),
                torch.zeros_like(weight) if need_grad_weight else weight.new_empty(0))
    grad_weight = weight.new_empty(0)
    if need_grad_weight:
        grad_weight = torch.empty_like(weight)
        grad_weight[valid_cols:].zero_()
    grad_hidden = None
    if need_grad_hidden:
        grad_hidden = torch.zeros(n_rows, hidden_size, dtype=torch.float32, device=hidden.device)
    if hidden.is_cuda:
        _ensure_allocator()
        chunk = grad_chunk_columns(n_rows, valid_cols, hidden.element_size())
        programs = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        grad_kernel, grad_options = _grad_logits_kernel_tuned, {"GROUP_N": GROUP_ROWS, **LAUNCH_OPTIONS}
        accumulate_options = {"GROUP_M": GROUP_ROWS}
    else:
        block_v = interpreter_block_v(valid_cols)
        chunk = min(INTERPRETER_BLOCKS_PER_CHUNK * block_v, valid_cols)
        programs = INTERPRETER_PROGRAMS
        grad_kernel = _grad_logits_kernel
        grad_options = {
            "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_V": block_v, "BLOCK_K": INTERPRETER_BLOCK_K,
            "GROUP_N": INTERPRETER_GROUP_ROWS, **INTERPRETER_VARIANT,
        }
        # A quarter of a column block deep: few interpreted iterations, a ragged tail on a ragged chunk.
        accumulate_options = {
            "BLOCK_M": INTERPRETER_BLOCK_N, "BLOCK_N": INTERPRETER_BLOCK_N, "BLOCK_K": block_v // 4,
            "GROUP_M": INTERPRETER_GROUP_ROWS,
        }
    grad_logits = torch.empty(n_rows, chunk, dtype=hidden.dtype, device=hidden.device)
    dot_options = _dot_options(hidden)
    bucket = rows_bucket(n_rows)

    for chunk_start in range(0, valid_cols, chunk):
        chunk_cols = min(chunk, valid_cols - chunk_start)
        weight_chunk = weight[chunk_start:chunk_start + chunk_cols]
        with phase("grad-logits", hidden.device):
            grad_kernel[_grad_grid(n_rows, chunk_cols, programs)](
                hidden, weight_chunk, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy, grad_logits,
                n_rows, hidden_size, chunk_start, chunk_cols, vocab_start, vocab_size, 1.0 / temperature,
                hidden.stride(0), weight.stride(0), grad_logits.stride(0), bucket,
                int(_tma_aligned(hidden, weight_chunk)),
                **grad_options, **dot_options,
            )
        chunk_grad = grad_logits[:, :chunk_cols]
        if need_grad_weight:
            with phase("dW", hidden.device):
                torch.mm(chunk_grad.t(), hidden, out=grad_weight[chunk_start:chunk_start + chunk_cols])
        if need_grad_hidden:
            with phase("dX", hidden.device):
                accumulate_product(
                    grad_hidden, chunk_grad, weight_chunk, rows_bucket=bucket,
                    triton_options={**accumulate_options, **dot_options},
                )
    return (grad_hidden.to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0)), grad_weight
