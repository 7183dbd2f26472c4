"""The C++ copy engine (`torch.ops.megarl.execute_copy_plan`) against a torch reference.

The plans' tests run (the ``run`` fixture) on the CPU engine, on the CUDA kernel (``cuda``: marked
gpu, skipped without CUDA), and on the CUDA kernel's logic compiled for the host
(``emulated-*``): tests/weights/copy_plan_emulation.cpp emulates the few CUDA built-ins
csrc/copy_plan_kernel.cuh uses and runs its threads one after another, with 1 block or 3 (which
stride over the tiles), so its slot and tile index maths, the split of each row into 16-byte words
and element-wise heads and tails, the funnel shifts of misaligned sources and the conversions in
registers run here; it also counts 16- and 8-byte accesses at misaligned addresses (a GPU would
fault on them). What the emulation cannot check is the GPU itself: memory ordering, speed, the
launch (tests/weights/test_copy_plan_cuda.py, on a GPU).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from megarl.weights.copy_plan import (
    OUT_OFFSET,
    PLAN_COLUMNS,
    ROW_LENGTH,
    SOURCE,
    SOURCE_DTYPE,
    dtype_code,
    empty_plan,
    execute_copy_plan,
)

pytestmark = pytest.mark.cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(plan: torch.Tensor, sources: list[torch.Tensor], out: torch.Tensor) -> None:
    """The plan's meaning, one row at a time with torch ops."""
    codes = {code: dtype for dtype, code in (zip(DTYPES, map(dtype_code, DTYPES)))}
    for row in plan.tolist():
        source, source_offset, source_stride, out_offset, out_stride, rows, length, source_code, out_code = row
        source_dtype, out_dtype = codes[source_code], codes[out_code]
        raw = sources[source].reshape(-1).view(torch.uint8)
        for r in range(rows):
            start = source_offset + r * source_stride
            values = raw[start : start + length * source_dtype.itemsize].clone().view(source_dtype)
            converted = values.to(out_dtype).view(torch.uint8)
            begin = out_offset + r * out_stride
            out[begin : begin + converted.numel()] = converted


def random_plan(generator: torch.Generator, sources: list[torch.Tensor], out_bytes: int, out_dtype, count: int):
    """``count`` non-overlapping 2-D copies from typed sources, at unaligned output offsets."""
    rows, cursor = [], 1 + int(torch.randint(0, 3, (), generator=generator)) * 2
    for _ in range(count):
        index = int(torch.randint(0, len(sources), (), generator=generator))
        source = sources[index]
        height, width = source.shape
        copy_rows = int(torch.randint(1, height + 1, (), generator=generator))
        length = int(torch.randint(1, width + 1, (), generator=generator))
        first_column = int(torch.randint(0, width - length + 1, (), generator=generator))
        size = source.element_size()
        out_stride = length * out_dtype.itemsize + 2 * int(torch.randint(0, 3, (), generator=generator))
        rows.append(
            [index, first_column * size, width * size, cursor, out_stride, copy_rows, length,
             dtype_code(source.dtype), dtype_code(out_dtype)]
        )
        cursor += copy_rows * out_stride + 2
    assert cursor <= out_bytes
    return torch.tensor(rows, dtype=torch.int64)


def run_on_cpu(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int) -> torch.Tensor:
    """``plan`` executed into a fresh zeroed ``out`` of ``out_bytes``."""
    out = torch.zeros(out_bytes, dtype=torch.uint8)
    execute_copy_plan(plan, sources, out)
    return out


def run_on_cuda(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int) -> torch.Tensor:
    """``plan`` executed by the CUDA kernel into a fresh zeroed ``out``, brought back to the CPU."""
    if not torch.ops.megarl.built_with_cuda():
        pytest.fail("megarl._C was built without its CUDA kernels on a machine with CUDA: rebuild it with nvcc on PATH")
    out = torch.zeros(out_bytes, dtype=torch.uint8, device="cuda")
    execute_copy_plan(plan, [source.cuda() for source in sources], out)
    torch.cuda.synchronize()
    return out.cpu()


HARNESS = Path(__file__).resolve().parent / "copy_plan_emulation.cpp"
CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.fixture(scope="module")
def emulation(tmp_path_factory) -> ctypes.CDLL:
    """tests/weights/copy_plan_emulation.cpp built with the host's C++ compiler."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    library = tmp_path_factory.mktemp("copy_kernel") / "copy_plan_emulation.so"
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", *includes, f"-I{CSRC}", str(HARNESS), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    loaded = ctypes.CDLL(str(library))
    loaded.emulate.restype = ctypes.c_int64
    loaded.emulate.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return loaded


def run_emulated(emulation: ctypes.CDLL, blocks: int):
    """``run(plan, sources, out_bytes) -> out`` through the emulated kernel with ``blocks`` blocks;
    fails on any misaligned wide access."""

    def run(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int) -> torch.Tensor:
        plan = plan.contiguous()
        sources = [source.contiguous() for source in sources]
        pointers = (ctypes.c_void_p * max(len(sources), 1))(*[source.data_ptr() for source in sources])
        out = torch.zeros(out_bytes, dtype=torch.uint8)
        misaligned = emulation.emulate(plan.data_ptr(), plan.shape[0], pointers, out.data_ptr(), blocks)
        assert misaligned == 0, f"{misaligned} 16- or 8-byte accesses at misaligned addresses"
        return out

    return run


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu), "emulated-1-block", "emulated-3-blocks"])
def run(request):
    """One engine: ``run(plan, sources, out_bytes) -> out`` on the CPU."""
    if request.param.startswith("emulated"):
        return run_emulated(request.getfixturevalue("emulation"), 1 if request.param == "emulated-1-block" else 3)
    return run_on_cpu if request.param == "cpu" else run_on_cuda


def expected_bytes(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int) -> torch.Tensor:
    expected = torch.zeros(out_bytes, dtype=torch.uint8)
    reference(plan, sources, expected)
    return expected


def check_matches_reference(plan: torch.Tensor, sources: list[torch.Tensor], out_bytes: int, run) -> None:
    assert torch.equal(run(plan, sources, out_bytes), expected_bytes(plan, sources, out_bytes))


def check_strided_conversions(source_dtype: torch.dtype, out_dtype: torch.dtype, run) -> None:
    """Random 2-D copies of odd widths (rows neither aligned nor a multiple of anything)."""
    generator = torch.Generator().manual_seed(3 * DTYPES.index(source_dtype) + DTYPES.index(out_dtype))
    sources = [torch.randn(shape, generator=generator).to(source_dtype) for shape in ((7, 13), (5, 33), (64, 257))]
    plan = random_plan(generator, sources, 1 << 22, out_dtype, count=40)
    check_matches_reference(plan, sources, 1 << 22, run)


def raw_bytes(values: torch.Tensor, offset: int) -> torch.Tensor:
    """A uint8 staging buffer holding ``values``' bytes from byte ``offset`` (and a few spare bytes)."""
    raw = torch.zeros(offset + values.numel() * values.element_size() + 32, dtype=torch.uint8)
    raw[offset : offset + values.numel() * values.element_size()] = values.reshape(-1).view(torch.uint8)
    return raw


# (source byte offset, out byte offset, rows, out row stride padding in bytes): the same or
# different misalignments of source and output, 2 bytes off (a bf16 tensor after an odd-sized
# one in a bucket), strides that move each row's alignment, and odd addresses.
MISALIGNMENTS = [(2, 0, 1, 0), (0, 2, 1, 0), (2, 2, 1, 0), (10, 6, 1, 0), (2, 4, 3, 2), (16, 14, 5, 6), (3, 1, 2, 1)]


def check_misaligned_copies(source_dtype: torch.dtype, out_dtype: torch.dtype, run) -> None:
    """Long rows whose source and output start off 16-byte boundaries (most bytes still move in
    the kernel's 16-byte words, shifted into place)."""
    generator = torch.Generator().manual_seed(17 + DTYPES.index(source_dtype))
    length = 4099
    values = torch.randn(5 * length, generator=generator).to(source_dtype)
    rows, out_bytes = [], 0
    sources = []
    for index, (source_offset, out_offset, count, padding) in enumerate(MISALIGNMENTS):
        sources.append(raw_bytes(values, source_offset))
        out_stride = length * out_dtype.itemsize + padding
        rows.append([index, source_offset, length * source_dtype.itemsize, out_bytes + out_offset, out_stride, count,
                     length, dtype_code(source_dtype), dtype_code(out_dtype)])
        out_bytes += out_offset + count * out_stride + 16
    check_matches_reference(torch.tensor(rows, dtype=torch.int64), sources, out_bytes, run)


def check_odd_sizes(run) -> None:
    """Every length from 1 to 40 elements, every dtype pair, at offsets that walk through a slot."""
    rows, out_bytes = [], 2
    sources = [torch.randn(64, generator=torch.Generator().manual_seed(23)).to(dtype) for dtype in DTYPES]
    for length in range(1, 41):
        for source_index, source_dtype in enumerate(DTYPES):
            for out_dtype in DTYPES:
                rows.append([source_index, (length % 9) * source_dtype.itemsize, 0, out_bytes, 0, 1, length,
                             dtype_code(source_dtype), dtype_code(out_dtype)])
                out_bytes += length * out_dtype.itemsize + 2
    check_matches_reference(torch.tensor(rows, dtype=torch.int64), sources, out_bytes + 64, run)


def check_many_small_copies(run, count: int = 3000) -> None:
    """Thousands of small copies of mixed dtype pairs (several per kernel tile, kinds interleaved)."""
    generator = torch.Generator().manual_seed(29)
    sources = [torch.randn(4096, generator=generator).to(dtype) for dtype in DTYPES]
    rows, out_bytes = [], 0
    for _ in range(count):
        source_index, out_index = (int(value) for value in torch.randint(0, 3, (2,), generator=generator))
        length = int(torch.randint(1, 300, (), generator=generator))
        first = int(torch.randint(0, 4096 - length, (), generator=generator))
        out_bytes += 2 * int(torch.randint(0, 9, (), generator=generator))
        rows.append([source_index, first * DTYPES[source_index].itemsize, 0, out_bytes, 0, 1, length,
                     source_index, out_index])
        out_bytes += length * DTYPES[out_index].itemsize
    check_matches_reference(torch.tensor(rows, dtype=torch.int64), sources, out_bytes, run)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_strided_copies_with_conversion_match_torch(source_dtype, out_dtype, run):
    check_strided_conversions(source_dtype, out_dtype, run)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_copies_misaligned_against_16_bytes(source_dtype, out_dtype, run):
    check_misaligned_copies(source_dtype, out_dtype, run)


def test_odd_sizes_of_every_dtype_pair(run):
    check_odd_sizes(run)


def test_many_small_copies(run):
    check_many_small_copies(run)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Infinities, extremes, subnormals and exact rounding ties of bf16 and fp16."""
    values = [0.0, -0.0, float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-40, -1e-42, 65504.0, 65520.0, 6e-8,
              1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-8)]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def check_special_values(source_dtype: torch.dtype, out_dtype: torch.dtype, run) -> None:
    """``run(plan, sources, out_bytes) -> out`` rounds the special values as ``Tensor.to`` does
    (shared with the CUDA kernel's tests)."""
    source = special_values(source_dtype)
    plan = torch.tensor(
        [[0, 0, 0, 0, 0, 1, source.numel(), dtype_code(source_dtype), dtype_code(out_dtype)]], dtype=torch.int64
    )
    out = run(plan, [source], source.numel() * out_dtype.itemsize)
    assert torch.equal(out, source.to(out_dtype).view(torch.uint8))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_special_values_round_like_torch(source_dtype, out_dtype, run):
    check_special_values(source_dtype, out_dtype, run)


def check_nan_stays_nan(run) -> None:
    """NaN stays NaN through ``run`` in both 16-bit dtypes (shared with the CUDA kernel's tests)."""
    source = torch.tensor([float("nan"), 1.0, float("nan")])
    for out_dtype in (torch.bfloat16, torch.float16):
        plan = torch.tensor([[0, 0, 0, 0, 0, 1, 3, 0, dtype_code(out_dtype)]], dtype=torch.int64)
        out = run(plan, [source], 3 * out_dtype.itemsize)
        assert torch.equal(out.view(out_dtype).float().isnan(), source.isnan())


def test_nan_stays_nan(run):
    check_nan_stays_nan(run)


def test_raw_byte_source_holding_several_dtypes():
    floats, halves = torch.randn(10), torch.randn(6).to(torch.bfloat16)
    staging = torch.cat([floats.view(torch.uint8), torch.zeros(2, dtype=torch.uint8), halves.view(torch.uint8)])
    plan = torch.tensor(
        [[0, 0, 0, 0, 0, 1, 10, 0, 1], [0, 42, 0, 20, 0, 1, 6, 1, 0]], dtype=torch.int64
    )
    out = torch.zeros(44, dtype=torch.uint8)
    execute_copy_plan(plan, [staging], out)
    assert torch.equal(out[:20].view(torch.bfloat16), floats.to(torch.bfloat16))
    assert torch.equal(out[20:].view(torch.float32), halves.float())


@pytest.mark.parametrize("threads", [1, 2])
def test_large_copies_split_over_threads(threads):
    # Rows above and below the engine's 256 KiB unit, and a row-parallel style strided block.
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 200_000, generator=generator)
    narrow = torch.randn(4096, 96, generator=generator).to(torch.bfloat16)
    plan = torch.tensor(
        [
            [0, 0, 0, 0, 0, 1, 600_000, 0, 1],
            [0, 4, 800_000, 1_200_000, 400_000, 3, 100_000, 0, 0],
            [1, 64, 192, 2_400_000, 100, 4096, 48, 1, 1],
        ],
        dtype=torch.int64,
    )
    out_bytes = 2_400_000 + 4096 * 100
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run_on_cpu(plan, [wide, narrow], out_bytes)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out, expected_bytes(plan, [wide, narrow], out_bytes))


def test_streaming_stores_for_large_outputs():
    # Over 16 MiB of output: same-dtype rows are written with streaming stores, at unaligned offsets.
    source = torch.randn(64, 140_000, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    plan = torch.tensor(
        [[0, 0, 0, 3, 0, 1, 64 * 140_000, 1, 1], [0, 2000, 280_000, 17_920_010, 120_006, 64, 60_000, 1, 1]],
        dtype=torch.int64,
    )
    out_bytes = 17_920_010 + 64 * 120_006
    assert torch.equal(run_on_cpu(plan, [source], out_bytes), expected_bytes(plan, [source], out_bytes))


def check_shards_side_by_side(source_dtype: torch.dtype, run) -> None:
    """Row-parallel shards: each writes its columns of every output row (shared with the CUDA
    kernel's tests)."""
    generator = torch.Generator().manual_seed(5)
    shards = [torch.randn(700, 96, generator=generator).to(source_dtype) for _ in range(3)]
    size = source_dtype.itemsize
    # 3 shards of 96 columns into rows of 300 bf16 (12 columns of padding at the end of each row).
    plan = torch.tensor(
        [[index, 0, 96 * size, 8 + index * 192, 600, 700, 96, dtype_code(source_dtype), 1] for index in range(3)],
        dtype=torch.int64,
    )
    out = run(plan, shards, 8 + 700 * 600)
    rows = out[8:].view(torch.bfloat16).view(700, 300)
    assert torch.equal(rows[:, :288], torch.cat(shards, dim=1).to(torch.bfloat16))
    assert torch.equal(rows[:, 288:], torch.zeros(700, 12, dtype=torch.bfloat16))


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_shards_side_by_side_in_the_output_rows(source_dtype, run):
    """Row-parallel shards, as one group on the CPU engine's threads."""
    check_shards_side_by_side(source_dtype, run)


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


def test_empty_plan_and_empty_copies_write_nothing():
    out = torch.full((8,), 7, dtype=torch.uint8)
    execute_copy_plan(empty_plan(), [], out)
    execute_copy_plan(torch.tensor([[0, 0, 0, 0, 0, 0, 5, 0, 0]], dtype=torch.int64), [torch.ones(5)], out)
    assert torch.equal(out, torch.full((8,), 7, dtype=torch.uint8))


def valid_row() -> list[int]:
    return [0, 0, 0, 0, 0, 1, 4, 0, 0]


@pytest.mark.parametrize(
    "column,value,message",
    [
        (SOURCE, 1, "reads source 1 but 1 sources were given"),
        (ROW_LENGTH, 5, "reaches byte 20 of its source, which holds only 16 bytes"),
        (OUT_OFFSET, 2, "reaches byte 18 of out, which holds only 16 bytes"),
        (OUT_OFFSET, -4, "negative offset \\(-4\\) or row stride \\(0\\) into out"),
        (SOURCE_DTYPE, 7, "source dtype code 7"),
        (SOURCE_DTYPE, 1, "reads source 0 as bfloat16 but it holds Float"),
    ],
)
def test_bad_rows_are_named(column, value, message):
    row = valid_row()
    row[column] = value
    with pytest.raises(RuntimeError, match=message):
        execute_copy_plan(torch.tensor([row], dtype=torch.int64), [torch.ones(4)], torch.zeros(16, dtype=torch.uint8))


def test_bad_plan_and_tensors_are_rejected():
    plan = torch.tensor([valid_row()], dtype=torch.int64)
    out = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="contiguous int64 CPU tensor"):
        execute_copy_plan(plan.int(), [torch.ones(4)], out)
    with pytest.raises(RuntimeError, match=f"\\[num_copies, {PLAN_COLUMNS}\\]"):
        execute_copy_plan(plan[:, :8].contiguous(), [torch.ones(4)], out)
    with pytest.raises(RuntimeError, match="not contiguous"):
        execute_copy_plan(plan, [torch.ones(4, 2).t()], out)
    with pytest.raises(RuntimeError, match="flat uint8"):
        execute_copy_plan(plan, [torch.ones(4)], torch.zeros(4))


def test_dtype_code_names_the_supported_dtypes():
    assert [dtype_code(dtype) for dtype in DTYPES] == [0, 1, 2]
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        dtype_code(torch.int64)
