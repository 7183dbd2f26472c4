"""The CUDA copy kernel (``csrc/copy_plan_cuda.cu``) on a GPU, beyond the plans' tests that
tests/weights/test_copy_plan.py runs on both devices: the kernel against the CPU engine on a large
random plan, rows far longer than a tile and an output over 16 MiB, the caller's stream, and the
device check.
"""

from __future__ import annotations

import pytest
import torch

from megarl.weights.copy_plan import empty_plan, execute_copy_plan
from tests.weights.test_copy_plan import DTYPES, expected_bytes, random_plan, run_on_cpu, run_on_cuda

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels_built():
    if not torch.ops.megarl.built_with_cuda():
        pytest.fail("megarl._C was built without its CUDA kernels on a machine with CUDA: rebuild it with nvcc on PATH")


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_many_strided_copies_match_the_cpu_engine(source_dtype, out_dtype):
    generator = torch.Generator().manual_seed(11 + 3 * DTYPES.index(source_dtype) + DTYPES.index(out_dtype))
    sources = [torch.randn(shape, generator=generator).to(source_dtype) for shape in ((7, 13), (5, 33), (64, 257))]
    plan = random_plan(generator, sources, 1 << 20, out_dtype, count=120)
    out = run_on_cuda(plan, sources, 1 << 20)
    assert torch.equal(out, expected_bytes(plan, sources, 1 << 20))
    assert torch.equal(out, run_on_cpu(plan, sources, 1 << 20))


def test_long_rows_strided_blocks_and_a_large_output():
    # Rows far longer than a tile, a strided block at odd offsets, narrow bf16 rows, and over
    # 16 MiB of output (the CPU engine's streaming-store size; here, many tiles per copy).
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 200_000, generator=generator)
    narrow = torch.randn(4096, 96, generator=generator).to(torch.bfloat16)
    big = torch.randn(64, 140_000, generator=generator).to(torch.bfloat16)
    plan = torch.tensor(
        [
            [0, 0, 0, 0, 0, 1, 600_000, 0, 1],
            [0, 4, 800_000, 1_200_000, 400_000, 3, 100_000, 0, 0],
            [1, 64, 192, 2_400_000, 100, 4096, 48, 1, 1],
            [2, 0, 0, 2_900_003, 0, 1, 64 * 140_000, 1, 1],
            [2, 2000, 280_000, 20_820_010, 120_006, 64, 60_000, 1, 1],
        ],
        dtype=torch.int64,
    )
    out_bytes = 20_820_010 + 64 * 120_006
    sources = [wide, narrow, big]
    assert torch.equal(run_on_cuda(plan, sources, out_bytes), expected_bytes(plan, sources, out_bytes))


def test_runs_on_the_current_stream():
    # The kernel is queued on the caller's stream: work queued after it on that stream sees its bytes.
    source = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    out = torch.zeros(4 << 20, dtype=torch.uint8, device="cuda")
    plan = torch.tensor([[0, 0, 0, 0, 0, 1, 1 << 20, 0, 0]], dtype=torch.int64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        execute_copy_plan(plan, [source], out)
        copied = out.view(torch.float32).clone()
    stream.synchronize()
    assert torch.equal(copied, source)


def test_empty_plan_writes_nothing_and_devices_must_match():
    out = torch.full((8,), 7, dtype=torch.uint8, device="cuda")
    execute_copy_plan(empty_plan(), [], out)
    assert torch.equal(out.cpu(), torch.full((8,), 7, dtype=torch.uint8))
    plan = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 0, 0]], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="source 0 is on cpu but out is on cuda:0; move them to one device"):
        execute_copy_plan(plan, [torch.ones(2)], out)
