"""What the two log-prob/entropy ops share: the partial statistics, and the set-up of their public functions.

Both :mod:`megarl.kernels.logprob_entropy` (from vocab-parallel logits) and
:mod:`megarl.kernels.fused_linear_logprob_entropy` (from the hidden states and the output layer's
shard) reduce each row to the same four partial statistics and split the work into the same three
custom ops (the maths and the reason for the split are in ``logprob_entropy``'s docstring):

- ``<op>_stats(*inputs, targets, *options)`` -> this shard's stats ``[4, N]`` (no autograd);
- the all-reduces of the stats over the tensor-parallel group (:func:`reduce_partial_stats`);
- ``<op>_finalize(*inputs, targets, stats, *options)`` -> ``(log_probs [N], entropy [N])``, whose
  backward calls ``<op>_backward(*inputs, targets, log_sum_exp, entropy, grad_log_probs,
  grad_entropy, *options)`` -> the gradient of each input;

with ``options = (vocab_start, vocab_size, temperature, backend)``. This module holds what does
not depend on the inputs: the two Triton helpers that both ops' kernels inline, the choice between
Triton and torch, the combination of partial statistics, the checks of the public functions'
arguments, the three steps above (:func:`run_split_op`) and the finalize op's fake and autograd
(:func:`register_finalize`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")

# The running max of a row with no valid column yet: finite, so that rescaling by
# exp(m_r - M) and the term (m_r - M) * s_r stay 0 instead of forming inf - inf.
EMPTY_ROW_MAX = tl.constexpr(-1e30)

# CPU tensors reach the kernels only through Triton's interpreter, which cannot autotune (it has
# no GPU to time configurations on) and whose cost is per launched program and per executed
# operation, hardly per element: blocks of 256 columns (fewer than the tests' 1000, so a ragged
# last block is exercised), widened on wide shards so that a row takes at most 8 blocks.
INTERPRETER_MIN_BLOCK_V = 256
INTERPRETER_MAX_BLOCKS = 8

# Compile options of every launch of a kernel that computes softmax terms: no multiply-add
# contraction. With it the compiler turns ``z * inv_temperature - row_max`` into one FMA of the
# exact product, while the max was taken over the rounded products, so the largest logit sits at
# its product's rounding error above the max instead of at 0 and a row whose mass is on one token
# gets ``p > 1``: on an H200, 1.5e-4 in dL/dx at logits of 5e3 (tests/kernels: test_peaked_and_flat_rows).
# Passed to the compiled launches only: the interpreter's numpy never contracts.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# MEGARL_AUTOTUNE=all (the default) autotunes every kernel over its whole list of configurations;
# MEGARL_AUTOTUNE=first keeps the first configuration of each list (no timing runs: a quick check
# such as tools/gpu_check.sh's, whose minutes the tuning of every kernel at every shape would take).
AUTOTUNE_ENV = "MEGARL_AUTOTUNE"
AUTOTUNE_MODES = ("all", "first")

# The autotuners' token-count key: N rounded up to a power of two, at least one 256-row bucket and
# at most 16384 (past it every configuration fills the GPU many times over). The best tiles and
# stages change with N (a 100-row micro-batch gives a 16-program dX grid, a 16k-row one
# thousands), while retuning for every packed micro-batch's exact N would stall training: at most
# 7 buckets are tuned per hidden size.
ROWS_BUCKET_MIN = 256
ROWS_BUCKET_MAX = 16384


# ----------------------------------------------------------------------------------------------
# Triton helpers (inlined into both ops' kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def online_softmax_update(row_max, sum_exp, weighted, z):
    """Fold a block ``z: [R, C]`` (masked entries -inf) into the running stats ``[R]`` of each row."""
    new_max = tl.maximum(row_max, tl.max(z, axis=1))
    shifted = z - new_max[:, None]
    exp_shifted = tl.exp(shifted)
    rescale = tl.exp(row_max - new_max)
    # exp underflows to 0 exactly where (z - max) may be -inf: keep 0 * -inf out of the sum.
    block_weighted = tl.sum(exp_shifted * tl.where(exp_shifted > 0, shifted, 0.0), axis=1)
    weighted = rescale * (weighted + (row_max - new_max) * sum_exp) + block_weighted
    sum_exp = rescale * sum_exp + tl.sum(exp_shifted, axis=1)
    return new_max, sum_exp, weighted


@triton.jit
def grad_from_logits(z, is_target, log_sum_exp, entropy, grad_log_prob, grad_entropy, inv_temperature):
    """``dL/dx`` of a block ``z: [R, C]`` (masked entries -inf -> 0) given row vectors ``[R]``."""
    log_p = z - log_sum_exp[:, None]
    p = tl.exp(log_p)
    entropy_term = p * tl.where(p > 0, log_p + entropy[:, None], 0.0)
    grad = -grad_log_prob[:, None] * p - grad_entropy[:, None] * entropy_term
    grad = tl.where(is_target, grad + grad_log_prob[:, None], grad)
    return grad * inv_temperature


@triton.jit
def grouped_block(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """``(row block, column block)`` of program ``pid`` in grouped order: ``GROUP`` consecutive row
    blocks sweep the column blocks together, so that each column tile is read from HBM once and
    then from L2."""
    programs_per_group = GROUP * n_col_blocks
    first_row_block = (pid // programs_per_group) * GROUP
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP)
    row_block = first_row_block + (pid % programs_per_group) % group_rows
    return row_block, (pid % programs_per_group) // group_rows


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` as ``MEGARL_AUTOTUNE`` trims them (read when ``megarl.kernels`` is imported)."""
    mode = os.environ.get(AUTOTUNE_ENV, "all")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(
            f"{AUTOTUNE_ENV}={mode!r} is not one of {AUTOTUNE_MODES}: set it to 'all' (autotune over every "
            "configuration, the default) or 'first' (the first configuration of each kernel, no tuning)"
        )
    return configs[:1] if mode == "first" else configs


def rows_bucket(n_rows: int) -> int:
    """The autotuners' token-count key for ``n_rows`` rows (see ``ROWS_BUCKET_MIN``)."""
    return min(ROWS_BUCKET_MAX, max(ROWS_BUCKET_MIN, triton.next_power_of_2(n_rows)))


def interpreter_block_v(n_cols: int) -> int:
    """The column block of the interpreted kernels for a shard of ``n_cols`` columns."""
    return max(INTERPRETER_MIN_BLOCK_V, triton.next_power_of_2(triton.cdiv(n_cols, INTERPRETER_MAX_BLOCKS)))


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` runs the Triton kernels on ``tensor``'s device.

    ``"auto"`` runs them on CUDA tensors only; ``"triton"`` on CPU tensors needs Triton's
    interpreter (``TRITON_INTERPRET=1`` set before ``megarl.kernels`` is imported).
    """
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return False
    if not tensor.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {tensor.device}); to run the kernels on the CPU "
            "under Triton's interpreter, set TRITON_INTERPRET=1 before importing megarl.kernels"
        )
    return True


# ----------------------------------------------------------------------------------------------
# Phase timing (tools/bench_kernels.py --phases)
# ----------------------------------------------------------------------------------------------

PHASES = ("stats", "grad-logits", "dW", "dX")
"""The ops' phases: the stats pass, the logit gradients (recomputed logits and their gradient;
op 1: the gradient of the given logits), the ``dW`` products and the ``dX`` products (op 2)."""


class PhaseTimer:
    """The spans of each phase the ops ran while it was active: CUDA events on CUDA tensors
    (read after a synchronize), ``time.perf_counter`` on the CPU."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object, object]] = []

    def seconds(self) -> dict[str, float]:
        """``{phase: seconds}`` summed over its spans (synchronizes CUDA first)."""
        totals: dict[str, float] = {}
        if any(not isinstance(start, float) for _, start, _ in self.spans):
            torch.cuda.synchronize()
        for name, start, end in self.spans:
            elapsed = end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3
            totals[name] = totals.get(name, 0.0) + elapsed
        return totals


_PHASE_TIMER: PhaseTimer | None = None


@contextlib.contextmanager
def timing_phases() -> Iterator[PhaseTimer]:
    """Record the ops' phases while the ``with`` block runs (one timer at a time)."""
    global _PHASE_TIMER
    _PHASE_TIMER = PhaseTimer()
    try:
        yield _PHASE_TIMER
    finally:
        _PHASE_TIMER = None


_NO_PHASE = contextlib.nullcontext()


def phase(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """One span of phase ``name`` on ``device``, recorded when :func:`timing_phases` is active
    (otherwise a shared no-op context: a fraction of a microsecond per call)."""
    return _NO_PHASE if _PHASE_TIMER is None else _timed_phase(_PHASE_TIMER, name, device)


@contextlib.contextmanager
def _timed_phase(timer: PhaseTimer, name: str, device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
    else:
        start = time.perf_counter()
        yield
        end = time.perf_counter()
    timer.spans.append((name, start, end))


# ----------------------------------------------------------------------------------------------
# Partial statistics
# ----------------------------------------------------------------------------------------------


def valid_columns(n_cols: int, vocab_start: int, vocab_size: int) -> int:
    """How many of this shard's ``n_cols`` columns lie below ``vocab_size`` (the rest is padding)."""
    return max(0, min(n_cols, vocab_size - vocab_start))


def empty_stats(n_rows: int, device: torch.device) -> torch.Tensor:
    """Partial statistics ``[4, N]`` of a shard with no valid column."""
    stats = torch.zeros(4, n_rows, dtype=torch.float32, device=device)
    stats[0] = EMPTY_ROW_MAX.value
    return stats


def rescale_partial_stats(stats: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """Express partial stats ``[..., 4, N]`` relative to ``global_max: [N]`` (so they add up)."""
    row_max, sum_exp, weighted, target_logit = stats.unbind(-2)
    shift = row_max - global_max
    scale = shift.exp()
    return torch.stack(
        (global_max.expand_as(row_max), scale * sum_exp, scale * (weighted + shift * sum_exp), target_logit), dim=-2
    )


def combine_partial_stats(partial: torch.Tensor) -> torch.Tensor:
    """Combine stats ``[S, 4, N]`` of S disjoint column ranges into ``[4, N]`` (in one process)."""
    global_max = partial[:, 0].amax(dim=0)
    combined = rescale_partial_stats(partial, global_max)
    return torch.cat((global_max[None], combined[:, 1:].sum(dim=0)))


def has_peers(group: dist.ProcessGroup | None) -> bool:
    """Whether the tensor-parallel ``group`` holds other ranks than this one (``None`` holds none)."""
    return group is not None and dist.get_world_size(group) > 1


def reduce_partial_stats(stats: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce this rank's stats ``[4, N]`` over ``group``: MAX of the max, then SUM of the rest.

    Returns ``stats`` itself when there is no group or it has one rank (no communication).
    """
    if not has_peers(group):
        return stats
    global_max = stats[0].clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    combined = rescale_partial_stats(stats, global_max)
    dist.all_reduce(combined[1:], op=dist.ReduceOp.SUM, group=group)
    return combined


def finalize_stats(stats: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """Reduced stats ``[4, N]`` -> ``(log_probs [N], entropy [N], log_sum_exp [N])``, fp32."""
    row_max, sum_exp, weighted, target_logit = stats.unbind(0)
    log_sum_exp_shifted = sum_exp.log()
    log_sum_exp = row_max + log_sum_exp_shifted
    log_probs = torch.where((targets >= 0) & (targets < vocab_size), target_logit - log_sum_exp, 0.0)
    entropy = log_sum_exp_shifted - weighted / sum_exp
    return log_probs, entropy, log_sum_exp


# ----------------------------------------------------------------------------------------------
# The public functions' set-up
# ----------------------------------------------------------------------------------------------


def check_arguments(
    backend: str, temperature: float, targets: torch.Tensor, rows: torch.Tensor, rows_name: str, last_dim: str
) -> None:
    """Raise ``ValueError`` naming the public function's argument that is out of range.

    ``rows: [..., last_dim]`` is the input whose leading dimensions ``targets`` must have.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if rows.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match {rows_name} {tuple(rows.shape)} without {last_dim}")


def vocab_range(n_cols: int, vocab_size: int | None, group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's shard of ``n_cols`` columns, checked."""
    tp_size = 1 if group is None else dist.get_world_size(group)
    tp_rank = 0 if group is None else dist.get_rank(group)
    padded = n_cols * tp_size
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size ({vocab_size}) must lie in [1, {padded}]: the {tp_size} shard(s) of {n_cols} "
            "columns hold the padded vocabulary"
        )
    return tp_rank * n_cols, vocab_size


def run_split_op(
    stats_op: Callable,
    finalize_op: Callable,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float,
    backend: str,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stats op on this shard, the all-reduces over ``group``, the finalize op.

    Args:
        stats_op, finalize_op: one op's ``torch.ops.megarl.<op>_stats`` and ``<op>_finalize``.
        inputs: the op's differentiable inputs, their rows flattened (``[N, ...]``) and laid out as
            its kernels read them.
        targets: ``[...]`` global token ids, ``N`` of them (handed to the ops as int32, ids outside
            ``[0, vocab_size)`` as -1).

    Returns:
        ``(log_probs, entropy)``, both shaped as ``targets``, fp32, differentiable in ``inputs``.
    """
    # int32 ids inside the kernels (narrower index arithmetic and compares than int64); ids outside
    # the vocabulary, whatever their width, become -1 first (they stay ignored).
    flat_targets = targets.reshape(-1)
    flat_targets = torch.where((flat_targets >= 0) & (flat_targets < vocab_size), flat_targets, -1).to(torch.int32)
    options = (vocab_start, vocab_size, float(temperature), backend)
    stats = stats_op(*(tensor.detach() for tensor in inputs), flat_targets, *options)
    stats = reduce_partial_stats(stats, group)
    log_probs, entropy = finalize_op(*inputs, flat_targets, stats, *options)
    return log_probs.view(targets.shape), entropy.view(targets.shape)


def register_finalize(finalize_op: torch.library.CustomOpDef, backward_op: Callable, *, grad_flags: bool = False) -> None:
    """Register ``finalize_op``'s fake and its autograd formula, which calls ``backward_op``.

    ``finalize_op`` takes ``(*inputs, targets, stats, vocab_start, vocab_size, temperature,
    backend)`` and returns ``(log_probs [N], entropy [N])``; ``backward_op`` returns the gradient
    of each of ``inputs`` (one tensor, or a tuple of them). With ``grad_flags``, ``backward_op``
    also takes one bool per input after the options, whether that input needs its gradient
    (``ctx.needs_input_grad``), and may return an empty tensor for one that does not (it becomes
    ``None``): a frozen output weight costs no ``dW`` product, hidden states that need no
    gradient no ``dX``.
    """

    def fake(*arguments):
        *_, stats, _vocab_start, _vocab_size, _temperature, _backend = arguments
        return stats.new_empty(stats.shape[1:]), stats.new_empty(stats.shape[1:])

    def setup_context(ctx, inputs, output):
        *tensors, vocab_start, vocab_size, temperature, backend = inputs  # tensors: *inputs, targets, stats
        ctx.save_for_backward(*tensors, output[1])
        ctx.options = (vocab_start, vocab_size, temperature, backend)

    def backward(ctx, grad_log_probs, grad_entropy):
        *differentiable, targets, stats, entropy = ctx.saved_tensors
        log_sum_exp = stats[0] + stats[1].log()
        needed = tuple(ctx.needs_input_grad[: len(differentiable)])
        flags = needed if grad_flags else ()
        grads = backward_op(
            *differentiable, targets, log_sum_exp, entropy, grad_log_probs, grad_entropy, *ctx.options, *flags
        )
        if isinstance(grads, torch.Tensor):
            grads = (grads,)
        grads = tuple(grad if need else None for grad, need in zip(grads, needed))
        # No gradient for targets, stats and the four options.
        return (*grads, None, None, None, None, None, None)

    finalize_op.register_fake(fake)
    finalize_op.register_autograd(backward, setup_context=setup_context)
