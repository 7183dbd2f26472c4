"""Output projection fused with per-token log-probability and entropy: the logits never exist whole.

This is :mod:`megarl.kernels.logprob_entropy` applied to ``logits = hidden @ weight.T`` for this
rank's vocabulary shard, with the same maths, masking, statistics and split into ops (read that
module's docstring first). The product is formed tile by tile, as in Cut Cross-Entropy (Liger's
fused linear cross-entropy materialises chunks of rows instead), with the entropy and its
gradient added.

On CUDA tensors the stats and grad passes run Triton kernels: their tiling, memory and work are
described in :mod:`megarl.kernels.fused_linear_logprob_entropy_triton`.

Tensor parallelism: ``hidden`` is the same on every rank of the group (the input of a
column-parallel output layer) and the gradient returned for it is the full one: each rank's part
(the sum over its own vocabulary shard) is all-reduced over the group in backward, as Megatron's
``copy_to_tensor_model_parallel_region`` does in front of its output layer. Under sequence
parallelism, gather the sequence-sharded hidden states with
``gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)`` and pass
``sum_hidden_grad=False``: the gather's backward then reduce-scatters the ranks' parts, so that each
rank receives the sum of its own sequence slice only (half the bytes of an all-reduce followed by
a split, as Megatron's own sequence-parallel output layer does). The gradient of ``weight`` reaches
``weight.grad`` through autograd as for any parameter, so a weight tied to the input embedding
accumulates both uses.

CPU tensors take a torch implementation chunked over rows and columns: its fp32 temporaries hold
at most ``TORCH_CHUNK_ELEMENTS / TORCH_CHUNK_COLUMNS`` rows by ``TORCH_CHUNK_COLUMNS`` columns (or
by ``H``), besides the fp32 ``dX`` accumulator. Small logits (at most ``TORCH_ONE_PASS_ELEMENTS``
fp32 elements over at most ``TORCH_CHUNK_COLUMNS`` valid columns) are formed in one product
instead, with no chunk bookkeeping and no combination of partial statistics; the only temporary
that grows is the fp32 copy of a lower-precision ``hidden``, ``N x H`` instead of a chunk's
rows. ``backend="triton"`` runs the kernels under Triton's interpreter as in ``logprob_entropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarl.kernels.common import (
    check_arguments,
    combine_partial_stats,
    empty_stats,
    finalize_stats,
    has_peers,
    phase,
    register_finalize,
    run_split_op,
    use_triton,
    valid_columns,
    vocab_range,
)
from megarl.kernels.fused_linear_logprob_entropy_triton import backward_triton, stats_triton
from megarl.kernels.logprob_entropy import TORCH_CHUNK_ELEMENTS, grad_logits_torch, partial_stats_torch

# CPU tensors take the torch path in chunks of at most this many vocabulary columns: each fp32
# partial sum of dX runs over at most 4096 columns before it is added to the total (fp32 rounding
# grows with the length of a sum), and a chunk of the weight shard upcast to fp32 stays 4096 x H.
TORCH_CHUNK_COLUMNS = 4096

# Logits of at most 2^18 fp32 elements (1 MiB, the L2 cache of a core of the project's CPU
# machine) are formed in one product: at the bundled models' shapes (52 valid columns) that takes
# 20-30 % less time than the chunked path, whose per-chunk calls cost more than their arithmetic.
# Larger one-pass temporaries were as often slower than the cache-sized chunks (a third slower at
# 4096 rows x 128 columns), so the chunks stay there (docs/benchmarks.md).
TORCH_ONE_PASS_ELEMENTS = 1 << 18


# ----------------------------------------------------------------------------------------------
# The torch implementation
# ----------------------------------------------------------------------------------------------


def _in_one_pass(n_rows: int, valid_cols: int) -> bool:
    """Whether the torch path forms the whole fp32 logits ``[n_rows, valid_cols]`` in one product."""
    return valid_cols <= TORCH_CHUNK_COLUMNS and n_rows * valid_cols <= TORCH_ONE_PASS_ELEMENTS


def _torch_chunks(n_rows: int, valid_cols: int):
    """``(rows, cols)`` slices of the torch path, column chunk by column chunk (see the constants)."""
    rows_per_chunk = max(1, TORCH_CHUNK_ELEMENTS // TORCH_CHUNK_COLUMNS)
    for col_start in range(0, valid_cols, TORCH_CHUNK_COLUMNS):
        cols = slice(col_start, min(col_start + TORCH_CHUNK_COLUMNS, valid_cols))
        yield cols, [slice(start, start + rows_per_chunk) for start in range(0, n_rows, rows_per_chunk)]


def _stats_torch(hidden, weight, targets, vocab_start, vocab_size, temperature):
    n_rows = hidden.shape[0]
    valid_cols = valid_columns(weight.shape[0], vocab_start, vocab_size)
    if valid_cols == 0 or n_rows == 0:
        return empty_stats(n_rows, hidden.device)
    if _in_one_pass(n_rows, valid_cols):
        logits = hidden.float() @ weight[:valid_cols].float().T
        return partial_stats_torch(logits, targets, vocab_start, vocab_size, temperature)
    partial = []
    for cols, row_chunks in _torch_chunks(n_rows, valid_cols):
        weight_chunk = weight[cols].float()
        stats = torch.empty(4, n_rows, dtype=torch.float32, device=hidden.device)
        for rows in row_chunks:
            logits = hidden[rows].float() @ weight_chunk.T
            stats[:, rows] = partial_stats_torch(
                logits, targets[rows], vocab_start + cols.start, vocab_size, temperature
            )
        partial.append(stats)
    return combine_partial_stats(torch.stack(partial))


def _backward_torch(hidden, weight, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy,
                    vocab_start, vocab_size, temperature, need_grad_hidden=True, need_grad_weight=True):
    n_rows = hidden.shape[0]
    valid_cols = valid_columns(weight.shape[0], vocab_start, vocab_size)
    grad_weight = torch.zeros_like(weight) if need_grad_weight else weight.new_empty(0)
    if valid_cols == 0 or n_rows == 0 or not (need_grad_hidden or need_grad_weight):
        return (torch.zeros_like(hidden) if need_grad_hidden else hidden.new_empty(0)), grad_weight
    device = hidden.device
    if _in_one_pass(n_rows, valid_cols):
        with phase("grad-logits", device):
            hidden_fp32, weight_fp32 = hidden.float(), weight[:valid_cols].float()
            grad_logits = grad_logits_torch(
                hidden_fp32 @ weight_fp32.T, targets, log_sum_exp, entropy, grad_log_prob, grad_entropy,
                vocab_start, vocab_size, temperature,
            )
        if need_grad_weight:
            with phase("dW", device):
                grad_weight[:valid_cols] = grad_logits.T @ hidden_fp32
        grad_hidden = hidden.new_empty(0)
        if need_grad_hidden:
            with phase("dX", device):
                grad_hidden = (grad_logits @ weight_fp32).to(hidden.dtype)
        return grad_hidden, grad_weight
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad_hidden else None
    for cols, row_chunks in _torch_chunks(n_rows, valid_cols):
        weight_chunk = weight[cols].float()
        grad_weight_chunk = torch.zeros_like(weight_chunk) if need_grad_weight else None
        for rows in row_chunks:
            with phase("grad-logits", device):
                hidden_chunk = hidden[rows].float()
                grad_logits = grad_logits_torch(
                    hidden_chunk @ weight_chunk.T, targets[rows], log_sum_exp[rows], entropy[rows],
                    grad_log_prob[rows], grad_entropy[rows], vocab_start + cols.start, vocab_size, temperature,
                )
            # Each product is summed from zero and then added: addmm_ would continue a BLAS sum
            # from the running total, rounding every one of its small terms against that total.
            if need_grad_hidden:
                with phase("dX", device):
                    grad_hidden[rows] += grad_logits @ weight_chunk
            if need_grad_weight:
                with phase("dW", device):
                    grad_weight_chunk += grad_logits.T @ hidden_chunk
        if need_grad_weight:
            grad_weight[cols] = grad_weight_chunk
    return (grad_hidden.to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0)), grad_weight


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("megarl::fused_linear_logprob_entropy_stats", mutates_args=())
def fused_linear_logprob_entropy_stats(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    vocab_start: int, vocab_size: int, temperature: float, backend: str,
) -> torch.Tensor:
    """Stats pass on one shard: ``hidden: [N, H]``, ``weight: [V/TP, H]``, ``targets: [N]`` -> ``[4, N]``."""
    with phase("stats", hidden.device):
        if not use_triton(hidden, backend):
            return _stats_torch(hidden, weight, targets, vocab_start, vocab_size, temperature)
        valid_cols = valid_columns(weight.shape[0], vocab_start, vocab_size)
        if valid_cols == 0 or hidden.shape[0] == 0:
            return empty_stats(hidden.shape[0], hidden.device)
        return stats_triton(hidden, weight, targets, vocab_start, valid_cols, temperature)


@fused_linear_logprob_entropy_stats.register_fake
def _(hidden, weight, targets, vocab_start, vocab_size, temperature, backend):
    return hidden.new_empty((4, hidden.shape[0]), dtype=torch.float32)


@torch.library.custom_op("megarl::fused_linear_logprob_entropy_backward", mutates_args=())
def fused_linear_logprob_entropy_backward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, log_sum_exp: torch.Tensor,
    entropy: torch.Tensor, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor,
    vocab_start: int, vocab_size: int, temperature: float, backend: str,
    need_grad_hidden: bool = True, need_grad_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dhidden [N, H], dL/dweight [V/TP, H])`` from the reduced ``log_sum_exp``/``entropy: [N]``
    and the upstream gradients ``[N]``; ``dL/dhidden`` is this shard's part, padded rows of ``dW`` 0.
    A gradient whose ``need_grad_*`` is false is not computed (no ``dX`` or ``dW`` product) and
    comes back as an empty tensor."""
    args = (
        hidden, weight, targets, log_sum_exp, entropy, grad_log_probs.contiguous(), grad_entropy.contiguous(),
        vocab_start, vocab_size, temperature, need_grad_hidden, need_grad_weight,
    )
    return backward_triton(*args) if use_triton(hidden, backend) else _backward_torch(*args)


@fused_linear_logprob_entropy_backward.register_fake
def _(hidden, weight, targets, log_sum_exp, entropy, grad_log_probs, grad_entropy, vocab_start, vocab_size,
      temperature, backend, need_grad_hidden=True, need_grad_weight=True):
    return (torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0))


@torch.library.custom_op("megarl::fused_linear_logprob_entropy_finalize", mutates_args=())
def fused_linear_logprob_entropy_finalize(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
    vocab_start: int, vocab_size: int, temperature: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced ``stats: [4, N]`` -> ``(log_probs [N], entropy [N])`` fp32, differentiable in
    ``hidden`` and ``weight`` (the full derivative, ``stats`` being their normaliser; the gradient
    of ``hidden`` is this shard's part)."""
    log_probs, entropy, _ = finalize_stats(stats, targets, vocab_size)
    return log_probs, entropy


register_finalize(
    fused_linear_logprob_entropy_finalize, torch.ops.megarl.fused_linear_logprob_entropy_backward, grad_flags=True
)


class _SumGradientOverGroup(torch.autograd.Function):
    """Identity in forward; in backward, all-reduce (sum) the gradient over ``group``.

    The ranks' gradients of the shared ``hidden`` are their shards' parts of the full one.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def fused_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    sum_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and entropy of each row under ``softmax(hidden @ weight.T / T)``.

    Args:
        hidden: ``[..., H]`` final hidden states, the same on every rank of ``group``.
        weight: ``[V/TP, H]`` this rank's shard of the output layer (rank ``r`` holds vocabulary
            rows ``[r * V/TP, (r + 1) * V/TP)``), same dtype as ``hidden``; may be tied to the
            input embedding.
        targets: ``[...]`` global token ids; ids outside ``[0, vocab_size)`` (padding) give
            log-prob 0 and no log-prob gradient.
        temperature: the logits are divided by it (> 0).
        vocab_size: the real vocabulary; rows of ``weight`` at or past it (padding) are ignored
            and get zero gradient. Defaults to ``V/TP x TP``.
        group: the tensor-parallel group; ``None`` (or one rank) communicates nothing. With more
            ranks the statistics are all-reduced in forward and the gradient of ``hidden`` in
            backward (see the module docstring for sequence parallelism).
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.
        sum_hidden_grad: all-reduce the gradient of ``hidden`` over ``group`` in backward (the
            default); ``False`` hands back this rank's part, for a caller whose own backward
            reduces it (the reduce-scatter of a sequence-parallel gather, see the module docstring).

    Returns:
        ``(log_probs, entropy)``, both ``[...]`` fp32, differentiable in ``hidden`` and ``weight``.
    """
    check_arguments(backend, temperature, targets, hidden, "hidden", "H")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight ({tuple(weight.shape)}, {weight.dtype}) must be [V/TP, {hidden.shape[-1]}] in {hidden.dtype}"
        )
    vocab_start, vocab_size = vocab_range(weight.shape[0], vocab_size, group)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if sum_hidden_grad and has_peers(group):
        flat_hidden = _SumGradientOverGroup.apply(flat_hidden, group)
    return run_split_op(
        torch.ops.megarl.fused_linear_logprob_entropy_stats, torch.ops.megarl.fused_linear_logprob_entropy_finalize,
        (flat_hidden, weight.contiguous()), targets,
        vocab_start=vocab_start, vocab_size=vocab_size, temperature=temperature, backend=backend, group=group,
    )
