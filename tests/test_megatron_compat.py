"""The CPU compatibility layer for megatron-core (megarl.megatron_compat)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode

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


class _PassThroughMode(TorchFunctionMode):
    """A torch-function mode that changes nothing (another mode above the compatibility layer's)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_without_redirects_takes_the_mode_off_the_stack_for_the_call(monkeypatch):
    mode = megatron_compat.CudaToCpuMode()
    monkeypatch.setattr(megatron_compat, "_mode", mode)
    modes_seen = []

    def forward(module, tensor):
        modes_seen.append(_get_current_function_mode())
        return tensor + 1

    forward_without_redirects = megatron_compat._without_redirects(forward)
    assert torch.equal(forward_without_redirects(None, torch.zeros(2)), torch.ones(2))  # no mode at all
    with mode:
        assert torch.equal(forward_without_redirects(None, torch.zeros(2)), torch.ones(2))
        assert _get_current_function_mode() is mode  # back on the stack after the call
        # Another mode above it: the call runs under both, as it is.
        with _PassThroughMode() as above:
            forward_without_redirects(None, torch.zeros(2))
    assert modes_seen == [None, None, above]


def test_transformer_layers_run_without_the_mode_and_the_rest_with_it():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the compatibility layer is never enabled")
    # enable_cpu() patches torch.cuda process-wide, so it runs in a fresh interpreter.
    script = textwrap.dedent(
        """
        import torch
        from torch.overrides import _get_current_function_mode
        from megarl import megatron_compat, parallel, platform
        from megarl.config import ParallelConfig, resolve_model_path
        from megarl.models.builder import build_model, model_spec
        from megarl.models.loader import load_hf_config
        platform.init_distributed()
        pg_collection = parallel.initialize(ParallelConfig())
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(0)
        hf_config = load_hf_config(resolve_model_path("bundled:tiny-moe"))
        model = build_model(model_spec(hf_config, ParallelConfig()), "torch", pg_collection)[0]
        mode = _get_current_function_mode()
        assert isinstance(mode, megatron_compat.CudaToCpuMode)
        seen = {}
        def record(name):
            def hook(module, args):
                seen[name] = _get_current_function_mode()
            return hook
        model.embedding.register_forward_pre_hook(record("embedding"))
        model.decoder.layers[0].register_forward_pre_hook(record("layer"))
        tokens = torch.randint(0, hf_config.vocab_size, (2, 8))
        model(tokens, torch.arange(8).expand_as(tokens), None, labels=tokens).mean().backward()
        assert seen == {"embedding": mode, "layer": None}, seen
        assert _get_current_function_mode() is mode
        print("layers-ok")
        """
    )
    result = run_python_source(script)
    assert "layers-ok" in result.stdout


@pytest.mark.gpu
def test_enable_cpu_refuses_on_cuda_machines():
    with pytest.raises(RuntimeError, match="without CUDA"):
        megatron_compat.enable_cpu()


def test_compile_on_first_call_gives_the_compiled_result_and_imports_the_compiler_only_then():
    script = textwrap.dedent(
        """
        import sys, torch
        from megarl import megatron_compat

        @megatron_compat.compile_on_first_call
        def scaled(x):
            return x * 2 + 1

        @megatron_compat.compile_on_first_call(dynamic=False)
        def shifted(x):
            return x - 3

        assert "torch._dynamo" not in sys.modules, "decorating imported the compiler"
        assert scaled.__name__ == "scaled"
        x = torch.arange(4.0)
        assert torch.equal(scaled(x), x * 2 + 1) and torch.equal(shifted(x), x - 3)
        assert "torch._dynamo" in sys.modules
        """
    )
    run_python_source(script)


def test_compile_on_first_call_runs_eagerly_on_the_cpu():
    script = textwrap.dedent(
        """
        import sys, torch
        from megarl import megatron_compat

        megatron_compat.enable_cpu()

        @megatron_compat.compile_on_first_call
        def scaled(x):
            return x * 2 + 1

        x = torch.arange(4.0)
        assert torch.equal(scaled(x), x * 2 + 1)
        assert "torch._dynamo" not in sys.modules
        """
    )
    run_python_source(script)


def test_training_path_imports_megatron_without_the_compiler_or_wandb():
    # The start-up time this saves is in docs/benchmarks.md ("Main job"); this pins that nothing on
    # the training path brings either back, and that both stay importable.
    script = textwrap.dedent(
        """
        import sys
        import megarl.trainer.run, megarl.trainer.loop
        import megatron.core.jit
        from megarl import megatron_compat
        assert megatron.core.jit.jit_fuser is megatron_compat.compile_on_first_call
        leaked = [name for name in ("torch._dynamo", "torch._inductor", "wandb") if name in sys.modules]
        assert not leaked, leaked
        import torch, wandb
        assert torch.compile is not megatron_compat.compile_on_first_call
        """
    )
    run_python_source(script)


@pytest.mark.parametrize("interleaved,latent", [(False, False), (True, False), (False, True)])
def test_packed_rotary_equals_megatrons_loop_over_samples(interleaved, latent):
    from megatron.core.models.common.embeddings import rope_utils

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    loop = getattr(rope_utils._apply_rotary_pos_emb_thd, "__wrapped__", rope_utils._apply_rotary_pos_emb_thd)
    packed = megatron_compat._packed_rotary(loop)
    generator = torch.Generator().manual_seed(0)
    bounds = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    tokens = torch.randn(16, 3, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    freqs = torch.randn(7, 1, 1, 8, generator=generator, dtype=torch.float64)
    options = dict(rotary_interleaved=interleaved, multi_latent_attention=latent, mscale=1.0, cp_group=OneRank())
    expected = loop(tokens, bounds, freqs, **options)
    got = packed(tokens, bounds, freqs, **options)
    assert torch.equal(got, expected)
    (gradient,) = torch.autograd.grad(got.square().sum(), tokens)
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), tokens)
    assert torch.equal(gradient, expected_gradient)
    # Positions restart at every sample: the second sample's first token is rotated as position 0.
    assert torch.equal(got[5], loop(tokens[5:6], torch.tensor([0, 1], dtype=torch.int32), freqs, **options)[0])


def test_expert_bias_counts_leave_padding_out():
    import inspect
    from types import SimpleNamespace

    from megatron.core.transformer.moe.router import TopKRouter

    count = inspect.unwrap(TopKRouter._apply_expert_bias)
    router = SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(3, dtype=torch.long))
    routing_map = torch.tensor([[True, False, True], [False, True, True], [True, True, False], [False, False, True]])
    padding = torch.tensor([False, True, False, True])
    with pytest.raises(RuntimeError):
        count(router, routing_map, padding)
    megatron_compat._expert_bias_with_padding(count)(router, routing_map, padding)
    assert router.local_tokens_per_expert.tolist() == [2, 1, 1]
