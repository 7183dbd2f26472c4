"""The CPU compatibility layer for megatron-core (megarl.megatron_compat)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from megarl import megatron_compat
from tests.distributed import run_python_source

pytestmark = pytest.mark.cpu


def test_cuda_placements_are_redirected_to_cpu():
    with megatron_compat.CudaToCpuMode():
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2, device=0).device.type == "cpu"
        assert torch.tensor([1, 2], device="cuda:1", pin_memory=True).device.type == "cpu"
        source = torch.arange(4.0)
        assert source.cuda() is source
        assert source.to("cuda").device.type == "cpu"
        assert source.to(device="cuda", dtype=torch.float64).dtype == torch.float64
        # CPU placements and plain math are untouched.
        assert torch.zeros(2, device="cpu").device.type == "cpu"
        assert torch.equal(source + 1, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_stream_and_event_stand_ins_are_synchronous():
    stream = megatron_compat.CpuStream()
    other = megatron_compat.CpuStream()
    assert stream == other
    stream.wait_stream(other)
    start = stream.record_event()
    end = megatron_compat.CpuEvent(enable_timing=True)
    end.record()
    assert start.query() and end.query()
    assert start.elapsed_time(end) >= 0.0


def test_tensor_to_host_returns_arrays_for_split_sizes():
    splits = torch.tensor([3, 5])
    assert megatron_compat._tensor_to_host(splits, as_numpy=True).tolist() == [3, 5]
    assert megatron_compat._tensor_to_host(splits) is splits


def test_enable_cpu_runs_megatron_rng_and_moe_paths():
    # enable_cpu() patches torch.cuda process-wide, so it runs in a fresh interpreter.
    script = textwrap.dedent(
        """
        import numpy, torch
        from megarl import megatron_compat, parallel, platform
        from megarl.config import ParallelConfig
        platform.init_distributed()
        assert megatron_compat.cpu_enabled()
        assert torch.cuda.current_device() == torch.device("cpu")
        parallel.initialize(ParallelConfig())
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        model_parallel_cuda_manual_seed(7)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(4)
        # The fork restores the default stream and advances the forked one.
        assert torch.equal(before, torch.get_rng_state())
        with tracker.fork():
            second = torch.rand(4)
        assert not torch.equal(first, second)
        # Re-seeding reproduces the forked stream.
        tracker.reset()
        model_parallel_cuda_manual_seed(7)
        with tracker.fork():
            assert torch.equal(torch.rand(4), first)
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
        assert isinstance(splits, numpy.ndarray)
        assert moe_utils.te_general_gemm is None
        print("compat-ok")
        """
    )
    result = run_python_source(script)
    assert "compat-ok" in result.stdout


@pytest.mark.gpu
def test_enable_cpu_refuses_on_cuda_machines():
    with pytest.raises(RuntimeError, match="without CUDA"):
        megatron_compat.enable_cpu()
