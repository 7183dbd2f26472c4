"""The CUDA copy kernels' registers, read from the compiler without a GPU: csrc/copy_plan_cuda.cu
compiled for sm_90 (H100, H200) with ``-Xptxas -v``, every kernel without a spill to local memory.

Skipped without nvcc. A CPU build of torch lacks one generated header of c10's CUDA part
(``c10/cuda/impl/cuda_cmake_macros.h``, a single define); the test writes it into a scratch
include directory, as torch's CUDA build generates it.
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
KERNEL_SOURCE = REPO / "csrc" / "copy_plan_cuda.cu"
KINDS = 7
"""One kernel per kind: same-dtype bytes and the six conversions between fp32, bf16 and fp16."""
MAX_REGISTERS = 96
"""At most 96 registers a thread keeps two 256-thread blocks resident per SM (65536 registers)."""


def ptxas_report(tmp_path: Path) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    if not any((Path(path) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for path in torch.utils.cpp_extension.include_paths()):
        generated = tmp_path / "include" / "c10" / "cuda" / "impl"
        generated.mkdir(parents=True)
        (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp_path / 'include'}")
    command = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-DMEGARL_WITH_CUDA=1", *includes,
               f"-I{REPO / 'csrc'}", str(KERNEL_SOURCE), "-o", str(tmp_path / "copy_plan_cuda.o")]
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
