"""``acc (fp32) += a @ b`` for the fused op's ``dX``: through cuBLAS where torch can, else a Triton GEMM.

The grad pass of :mod:`megarl.kernels.fused_linear_logprob_entropy_triton` adds each vocabulary
chunk's ``G @ W[chunk]`` (``G: [N, C]`` logit gradients and ``W[chunk]: [C, H]``, both in the
input dtype) into an fp32 ``[N, H]`` accumulator, so that ``dX`` is rounded to the input dtype
once, after the last chunk. Two implementations, chosen by the environment variable
``MEGARL_FUSED_DX`` (read at every call):

- ``cublas`` (the default): torch's matmul with an fp32 result from bf16/fp16 operands
  (``out_dtype=torch.float32``, torch 2.8+ on CUDA): ``torch.addmm(acc, a, b,
  out_dtype=torch.float32, out=acc)`` where this torch accepts an fp32 ``acc`` (its epilogue adds
  the accumulator to the product, each summed in fp32 from zero), else ``acc += torch.mm(a, b,
  out_dtype=torch.float32)`` (one more read and write of ``[N, H]`` fp32 per chunk, by estimate
  under 4 % of the backward at N = 16384, H = 4096, 19 chunks). Which of them works is probed
  once per device and dtype on a small product checked against fp32 (:func:`torch_accumulate`).
  On a CUDA torch with neither it takes the Triton kernel below; on CPU tensors (the interpreter
  tests) torch multiplies the operands upcast to fp32 (exact: the products fit fp32); fp32
  operands take torch's plain product. Why the
  default: cuBLAS picks split-K / stream-K schedules for the short, deep products of small
  micro-batches (at N = 100 the Triton kernel's grid is 16 programs on 132 SMs) and its bf16
  GEMMs reach 85-90 % of the H100/H200 tensor-core peak, where the Triton GEMMs of this package
  measured 65-74 % (docs/benchmarks.md, H200) and its 128 x 256 accumulate tiles spill registers;
- ``triton``: :func:`_matmul_accumulate_kernel`, a grouped-order GEMM whose epilogue loads the
  fp32 tile, adds and stores it; the fallback, and what a GPU check compares cuBLAS against.

Both give the same sums up to fp32 rounding order (the tests run both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megarl.kernels.common import autotune_configs, grouped_block

FUSED_DX_ENV = "MEGARL_FUSED_DX"
FUSED_DX_MODES = ("cublas", "triton")

# (device type, dtype) -> "addmm", "mm" or None (neither works): the probe's answer, kept.
_TORCH_ACCUMULATE: dict[tuple[str, torch.dtype], str | None] = {}


def dx_mode() -> str:
    """``MEGARL_FUSED_DX`` checked: ``"cublas"`` (default) or ``"triton"``."""
    mode = os.environ.get(FUSED_DX_ENV, "cublas")
    if mode not in FUSED_DX_MODES:
        raise ValueError(
            f"{FUSED_DX_ENV}={mode!r} is not one of {FUSED_DX_MODES}: set it to 'cublas' (torch's matmul "
            "into the fp32 accumulator, the default) or 'triton' (the Triton accumulate kernel)"
        )
    return mode


def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """Which fp32-result matmul of ``dtype`` operands this torch runs on ``device``, checked on a
    small product whose bf16-rounded result would be off by far more than fp32 rounding."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(16, 64, generator=generator).to(dtype)
    b = torch.randn(64, 32, generator=generator).to(dtype)
    start = torch.randn(16, 32, generator=generator) * 1e-3
    expected = start.double() + a.double() @ b.double()
    a, b = a.to(device), b.to(device)
    for name in ("addmm", "mm"):
        acc = start.to(device, copy=True)
        try:
            if name == "addmm":
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc += torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if acc.dtype == torch.float32 and torch.allclose(acc.cpu().double(), expected, rtol=1e-5, atol=1e-5):
            return name
    return None


def torch_accumulate(device: torch.device, dtype: torch.dtype) -> str | None:
    """``"addmm"``, ``"mm"`` or ``None``: the fp32-result matmul torch offers for ``dtype`` on
    ``device`` (probed once per device type and dtype)."""
    key = (device.type, dtype)
    if key not in _TORCH_ACCUMULATE:
        _TORCH_ACCUMULATE[key] = _probe(device, dtype)
    return _TORCH_ACCUMULATE[key]


def _accumulate_configs() -> list[triton.Config]:
    # A plain GEMM epilogue (load, add, store fp32): the largest tiles whose fp32 accumulator
    # still fits two warpgroups' registers. First (the one MEGARL_AUTOTUNE=first keeps) the only
    # tile ptxas compiles without spills for sm_90 with Triton 3.6: 128 x 128 on 8 warps (the
    # 128 x 256 tiles spill 176 bytes, 256 x 128 96, 4 warps 132; docs/benchmarks.md).
    return autotune_configs([
        triton.Config({"BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
        for rows, cols, warps, stages in (
            (128, 128, 8, 4), (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 4, 4),
        )
    ])


@triton.heuristics({"EVEN_K": lambda args: args["inner"] % args["BLOCK_K"] == 0})
@triton.jit
def _matmul_accumulate_kernel(
    a_ptr, b_ptr, acc_ptr, n_rows, n_out, inner, a_stride, b_stride, acc_stride, rows_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc [M, N] (fp32) += a [M, K] @ b [K, N]`` (both row-major with the given row strides);
    ``rows_bucket`` is the autotuning key only."""
    row_block, out_block = grouped_block(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_out, BLOCK_N), GROUP_M)
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


# Timing runs the kernel repeatedly: restore the accumulator it adds into after each.
_matmul_accumulate_kernel_tuned = triton.autotune(
    configs=_accumulate_configs(), key=["n_out", "rows_bucket"], restore_value=["acc_ptr"]
)(_matmul_accumulate_kernel)


def accumulate_triton(acc, a, b, *, rows_bucket: int, options: dict) -> None:
    """``acc += a @ b`` with the Triton kernel: autotuned on CUDA tensors; on CPU tensors (the
    interpreter) ``options`` gives the blocks. ``options`` also holds the dot flags."""
    n_rows, n_out = acc.shape
    kernel = _matmul_accumulate_kernel_tuned if acc.is_cuda else _matmul_accumulate_kernel

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    kernel[grid](
        a, b, acc, n_rows, n_out, a.shape[1], a.stride(0), b.stride(0), acc.stride(0), rows_bucket, **options
    )


def accumulate_product(acc, a, b, *, rows_bucket: int, triton_options: dict) -> str:
    """``acc [N, H] (fp32) += a [N, C] @ b [C, H]`` as ``MEGARL_FUSED_DX`` says; returns the path
    taken: ``"addmm"``, ``"mm"`` (fp32 results of bf16/fp16 operands), ``"fp32"`` (fp32 operands:
    torch's plain product), ``"upcast"`` (CPU tensors) or ``"triton"``."""
    path = "triton"
    if dx_mode() == "cublas":
        if a.dtype == torch.float32:
            path = "fp32"
        else:
            path = torch_accumulate(acc.device, a.dtype) or ("upcast" if not acc.is_cuda else "triton")
    if path == "fp32":
        acc += a @ b
    elif path == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif path == "mm":
        acc += torch.mm(a, b, out_dtype=torch.float32)
    elif path == "upcast":
        acc += a.float() @ b.float()
    else:
        accumulate_triton(acc, a, b, rows_bucket=rows_bucket, options=triton_options)
    return path
