"""The CUDA copy kernels' registers, read from the compiler without a GPU: every kernel of
csrc/copy_plan_kernel.cuh (all of the extension's device code; csrc/copy_plan_cuda.cu only uploads
the plan and launches them) compiled for sm_90 (H100, H200) with ``-Xptxas -v``, none with a spill
to local memory.

The kernels are instantiated as the launcher does, through ``kernel_of``, in a translation unit of
their own, without ATen's and c10's CUDA headers: 31 - 38 s of CPU on the project's machine, against 52 s
for the whole of copy_plan_cuda.cu.
Skipped without nvcc.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

pytestmark = pytest.mark.cpu

REPO = Path(__file__).resolve().parents[2]
KERNELS = """
#include "copy_plan_kernel.cuh"
extern "C" void* megarl_copy_kernel(int kind) { return reinterpret_cast<void*>(megarl::copy_kernel::kernel_of(kind)); }
"""
KINDS = 7
"""One kernel per kind: same-dtype bytes and the six conversions between fp32, bf16 and fp16."""
MAX_REGISTERS = 96
"""At most 96 registers a thread keeps two 256-thread blocks resident per SM (65536 registers)."""


def ptxas_report(tmp_path: Path) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    source = tmp_path / "copy_plan_kernels.cu"
    source.write_text(KERNELS)
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    command = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", *includes, f"-I{REPO / 'csrc'}", str(source),
               "-o", str(tmp_path / "copy_plan_kernels.o")]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    return built.stdout + built.stderr


def kernel_reports(report: str) -> dict[str, tuple[int, int, int, int]]:
    """Kernel -> (registers, stack frame, spill stores, spill loads) in bytes, from ptxas's lines."""
    kernels = {}
    for match in re.finditer(
        r"Compiling entry function '(\w+)' for 'sm_90'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
        r"(\d+) bytes spill loads.*?Used (\d+) registers",
        report,
        re.S,
    ):
        name, stack, stores, loads, registers = match.groups()
        kernels[name] = (int(registers), int(stack), int(stores), int(loads))
    return kernels


def test_every_copy_kernel_compiles_for_sm90_without_spills(tmp_path):
    kernels = kernel_reports(ptxas_report(tmp_path))
    assert len(kernels) == KINDS, f"expected {KINDS} copy kernels in ptxas's report, found {sorted(kernels)}"
    for name, (registers, stack, stores, loads) in kernels.items():
        assert (stack, stores, loads) == (0, 0, 0), f"{name}: {stack} bytes stack, {stores}/{loads} bytes spilled"
        assert registers <= MAX_REGISTERS, f"{name}: {registers} registers"
