"""The CUDA copy kernel's logic on the CPU: csrc/copy_plan_kernel.cuh compiled for the host.

No GPU is needed: tests/weights/copy_plan_emulation.cpp emulates the few CUDA built-ins the kernel
uses and runs its threads one after another, so the slot and tile index maths, the split of each
row into 16-byte words and element-wise heads and tails, the funnel shifts of misaligned sources
and the conversions in registers run here on the plans of tests/weights/test_copy_plan.py,
against the same torch reference; the emulation also counts 16- and 8-byte accesses at
misaligned addresses (a GPU would fault on them). What it cannot check is the GPU itself:
memory ordering, speed, the launch (tests/weights/test_copy_plan_cuda.py does, on a GPU).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from tests.weights.test_copy_plan import (
    DTYPES,
    check_many_small_copies,
    check_misaligned_copies,
    check_nan_stays_nan,
    check_odd_sizes,
    check_shards_side_by_side,
    check_special_values,
    check_strided_conversions,
    expected_bytes,
)

pytestmark = pytest.mark.cpu

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "weights" / "copy_plan_emulation.cpp"


@pytest.fixture(scope="module")
def emulation(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    library = tmp_path_factory.mktemp("copy_kernel") / "copy_plan_emulation.so"
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", *includes, f"-I{REPO / 'csrc'}", str(HARNESS), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    loaded = ctypes.CDLL(str(library))
    loaded.emulate.restype = ctypes.c_int64
    loaded.emulate.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return loaded


@pytest.fixture(params=[1, 3], ids=["1-block", "3-blocks"])
def run(request, emulation):
    """``run(plan, sources, out_bytes) -> out`` through the emulated kernel with 1 or 3 blocks
    (3: the blocks stride over the tiles). Fails on any misaligned wide access."""

    def run_emulated(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int) -> torch.Tensor:
        plan = plan.contiguous()
        sources = [source.contiguous() for source in sources]
        pointers = (ctypes.c_void_p * max(len(sources), 1))(*[source.data_ptr() for source in sources])
        out = torch.zeros(out_bytes, dtype=torch.uint8)
        misaligned = emulation.emulate(plan.data_ptr(), plan.shape[0], pointers, out.data_ptr(), request.param)
        assert misaligned == 0, f"{misaligned} 16- or 8-byte accesses at misaligned addresses"
        return out

    return run_emulated


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_strided_copies_with_conversion_match_torch(source_dtype, out_dtype, run):
    check_strided_conversions(source_dtype, out_dtype, run)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_copies_misaligned_against_16_bytes(source_dtype, out_dtype, run):
    check_misaligned_copies(source_dtype, out_dtype, run)


def test_odd_sizes_and_many_small_copies(run):
    check_odd_sizes(run)
    check_many_small_copies(run)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_special_values_round_like_torch(source_dtype, out_dtype, run):
    check_special_values(source_dtype, out_dtype, run)


def test_nan_stays_nan_and_row_parallel_shards(run):
    check_nan_stays_nan(run)
    check_shards_side_by_side(torch.float32, run)
    check_shards_side_by_side(torch.bfloat16, run)


def test_long_rows_over_many_tiles(run):
    # Rows many tiles long, strided, at odd output offsets: every tile's first-copy lookup.
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 70_000, generator=generator)
    narrow = torch.randn(500, 96, generator=generator).to(torch.bfloat16)
    plan = torch.tensor(
        [
            [0, 0, 0, 0, 0, 1, 200_000, 0, 1],
            [0, 4, 280_000, 400_002, 200_006, 3, 50_000, 0, 0],
            [1, 64, 192, 1_000_100, 100, 500, 48, 1, 1],
        ],
        dtype=torch.int64,
    )
    out_bytes = 1_000_100 + 500 * 100
    assert torch.equal(run(plan, [wide, narrow], out_bytes), expected_bytes(plan, [wide, narrow], out_bytes))
