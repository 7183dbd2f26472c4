"""Make megatron-core 0.16 run where it was not written to: without Transformer Engine, and on CPU.

Without Transformer Engine (any machine), :func:`fix_missing_transformer_engine` repairs the
places megatron-core 0.16.1 breaks: the MoE router's gating GEMM reads a name, ``te_general_gemm``,
that is only bound when TE imports; multi-latent attention checks its output projection against
TE's ``TELinear``, a mock without TE, and raises; and loading a fully reshardable distributed-optimizer
checkpoint into torch's Adam (the optimizer used without TE or apex) copies a ``step`` entry that
the checkpoint keeps elsewhere, and gives every parameter the same ``step`` tensor, which Adam
then advances once per parameter at each step.

On any machine, :func:`repair_padded_and_packed_paths` mends two paths megarl's packed
micro-batches take: without fused rotary embeddings (megarl builds its models with
``apply_rope_fusion`` off), megatron-core applies rotary positions to packed (THD) sequences sample
by sample in Python, after reading the sample bounds to the host, in every attention layer
(:func:`_packed_rotary`); and a router with an expert bias counts its tokens with the padding mask
broadcast the wrong way (``[tokens, experts] & [tokens]``), which raises
(:func:`_expert_bias_with_padding`).

On CPU with gloo, :func:`enable_cpu` does the rest.

megatron-core assumes CUDA throughout: tensors are allocated on ``torch.cuda.current_device()`` or
``device="cuda"``, the RNG tracker saves and restores CUDA generator states, the MoE dispatcher and
the DDP buffers open CUDA streams and events, and a few paths call ``.cuda()``. None of this changes
the maths: on a CPU every op is synchronous, so a stream is a no-op and an event is always done.

:func:`enable_cpu` makes those assumptions true on a machine without CUDA, and is never applied when
CUDA is available (``megarl.platform`` calls it only then). It does five things:

1. ``torch.cuda.current_device()`` returns the CPU device, so the common
   ``torch.empty(..., device=torch.cuda.current_device())`` allocates on the CPU.
2. Streams, events and synchronisation become no-ops (:class:`CpuStream`, :class:`CpuEvent`).
3. The "CUDA" RNG state that Megatron's tracker forks for dropout and initialisation is the CPU
   default generator: on a CPU that is the generator those ops draw from.
4. The MoE all-to-all split sizes become host arrays, as they do after the device-to-host copy
   on CUDA.
5. A torch-function mode (:class:`CudaToCpuMode`) rewrites the remaining explicit CUDA placements
   (``device="cuda"``, ``Tensor.cuda()``, ``pin_memory=True``) to the CPU. This is the only part
   with a per-op cost: every torch call on its stack passes through Python. The transformer layers
   of the models megarl builds on the CPU (portable specs: torch attention, Megatron's MLP and MoE
   layers) place nothing on CUDA explicitly, so ``TransformerBlock.forward`` runs with the mode off
   the stack (:func:`_without_redirects`); the placements a training step does hit (the pipeline
   schedule's token counter, the optimizer's gradient norm and clipping, ``Tensor.type()`` checks)
   lie outside it. ``tools/bench_megatron_cpu.py`` measures what the mode still costs (see
   docs/benchmarks.md).

Nothing here touches collectives: gloo (torch >= 2.11) implements every one Megatron issues.

On any machine, :func:`lean_megatron_import` takes about two seconds off importing megatron-core
(half of it): Megatron decorates its fused element-wise functions with ``torch.compile`` when it is
imported, which imports TorchDynamo and Inductor even if none of those functions is ever called,
and it imports ``wandb`` for its inference context, which megarl does not use (megarl's own W&B
sink imports ``wandb`` when ``logging.wandb`` asks for it). With CUDA those functions are compiled
at their first call, as Megatron does; on the CPU (:func:`enable_cpu`) they run eagerly: compiling
them there means generating and building C++ at the first step (the MoE router's
``_apply_expert_bias`` is called on every forward) for element-wise work that is negligible at the
sizes a CPU trains.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode_temporarily

_enabled = False
_mode: CudaToCpuMode | None = None


class CpuEvent:
    """A CUDA event stand-in: CPU work is synchronous, so an event is complete once recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time_ns = 0
        self._enable_timing = enable_timing

    def record(self, stream: Any = None) -> None:
        import time

        self._time_ns = time.perf_counter_ns()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: CpuEvent) -> float:
        """Milliseconds between this event's record and ``end_event``'s."""
        return (end_event._time_ns - self._time_ns) / 1e6


class CpuStream:
    """A CUDA stream stand-in: every CPU op completes before the next starts, so ordering between
    streams holds by construction."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = torch.device("cpu")
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CpuStream)

    def __hash__(self) -> int:
        return hash(CpuStream)


_CPU_STREAM = CpuStream()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirect explicit CUDA placements to the CPU.

    Rewrites a CUDA ``device=`` argument to ``"cpu"``, makes ``Tensor.cuda()`` return the tensor
    itself, ``Tensor.to("cuda")`` a no-op move, drops ``pin_memory=True`` (pinning needs CUDA), and
    reports tensor type names as their CUDA counterparts (``Tensor.type()`` with no argument).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizer and gradient clipping check ``param.type()`` against the CUDA
            # type names; on the CPU the same tensor types are named without ``cuda.``.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.pin_memory:
            return args[0]
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def _without_redirects(forward):
    """Wrap a module's ``forward`` to run with :class:`CudaToCpuMode` off the torch-function mode
    stack, for code that places nothing on CUDA explicitly: its torch calls then skip the mode's
    Python dispatch. Where the mode is not the top of the stack (another mode above it, or none),
    ``forward`` runs as it is."""

    @functools.wraps(forward)
    def forward_without_redirects(self, *args, **kwargs):
        if _mode is None or _get_current_function_mode() is not _mode:
            return forward(self, *args, **kwargs)
        with _pop_mode_temporarily():
            return forward(self, *args, **kwargs)

    return forward_without_redirects


def _cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class _DropForkWarning(logging.Filter):
    """Megatron warns when the CPU RNG state changes inside a CUDA RNG fork. On CPU the forked
    state *is* the CPU generator, so the change is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.Stream = CpuStream
    cuda.Event = CpuEvent
    cuda.current_stream = lambda device=None: _CPU_STREAM
    cuda.default_stream = lambda device=None: _CPU_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None


def _tensor_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU version of Megatron's ``maybe_move_tensor_to_cpu``: the original converts only CUDA
    tensors, so on the CPU the MoE all-to-all split sizes stayed tensors, which
    ``all_to_all_single`` rejects. Convert them as the CUDA path does."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _patch_megatron() -> None:
    with lean_megatron_import():
        from megatron.core.tensor_parallel import random as tp_random
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        from megatron.core.transformer.transformer_block import TransformerBlock

    TransformerBlock.forward = _without_redirects(TransformerBlock.forward)
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    logging.getLogger(tp_random.__name__).addFilter(_DropForkWarning())
    moe_utils.maybe_move_tensor_to_cpu = _tensor_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _tensor_to_host


def _keep_adam_step(set_states):
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` so that torch Adam's
    per-parameter ``step`` (restored separately from the checkpoint's param groups) is kept rather
    than looked up among the loaded tensors, which do not carry it."""

    @functools.wraps(set_states)
    def set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return set_states(self, model_param, tensors)

    set_states_keeping_step.megarl_patched = True
    return set_states_keeping_step


def _separate_adam_steps(load_state_dict):
    """Wrap ``DistributedOptimizer.load_state_dict`` so that every parameter's Adam ``step`` is its
    own tensor. Without Apex or TE, megatron-core 0.16.1 gives every parameter's state the *same*
    step tensor when it loads a checkpoint, and torch Adam increments it in place once per
    parameter: after a resume each optimizer step advanced the bias correction by the number of
    parameters, and the updates differed from an uninterrupted run's."""

    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()

    load_state_dict_with_own_steps.megarl_patched = True
    return load_state_dict_with_own_steps


def compile_on_first_call(model: Callable | None = None, **options) -> Callable:
    """``torch.compile`` that compiles when the function is first called rather than when it is
    decorated, so that decorating imports nothing (``torch.compile`` is lazy about compiling but not
    about importing the compiler); where :func:`enable_cpu` has run, the function runs eagerly.
    Usable bare or with options, as ``torch.compile`` is."""
    if model is None:
        return functools.partial(compile_on_first_call, **options)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if _enabled:
            return model(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(model, **options)
        return compiled(*args, **kwargs)

    return call


@contextlib.contextmanager
def lean_megatron_import():
    """Import megatron-core inside this block without the compiler stack and ``wandb`` (see the module
    docstring). Megatron binds its ``jit_fuser`` to :func:`compile_on_first_call` when
    ``megatron.core.jit`` is first imported here, for the rest of the process; ``wandb`` is hidden
    from the imports in the block (unless it is imported already) and importable again after it.
    Nothing changes when megatron-core is imported already."""
    if "megatron.core.jit" in sys.modules:
        yield
        return
    eager_compile = torch.compile
    hide_wandb = "wandb" not in sys.modules
    torch.compile = compile_on_first_call
    if hide_wandb:
        sys.modules["wandb"] = None  # ``import wandb`` raises ImportError, which Megatron handles
    try:
        yield
    finally:
        torch.compile = eager_compile
        if hide_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


def _packed_rotary(loop):
    """megatron-core's unfused THD rotary embedding (``_apply_rotary_pos_emb_thd``, ``loop``), the
    same result without the loop: each token's position within its sample is its index minus its
    sample's start, and the frequencies are gathered at those positions in one indexing op. Only
    where positions restart at every sample without context parallelism (every pack megarl builds
    there); the other cases (context parallelism, frequencies for the whole pack) go to ``loop``."""

    @functools.wraps(loop)
    def apply(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0, cp_group=None):
        if cp_group is None or cp_group.size() > 1 or freqs.size(0) == t.size(0):
            return loop(t, cu_seqlens, freqs, rotary_interleaved, multi_latent_attention, mscale, cp_group)
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        starts = cu_seqlens[:-1].long()
        sample_starts = torch.repeat_interleave(starts, cu_seqlens.diff().long(), output_size=t.size(0))
        positions = torch.arange(t.size(0), device=t.device) - sample_starts
        return _apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[positions], rotary_interleaved=rotary_interleaved, multi_latent_attention=multi_latent_attention,
            mscale=mscale,
        ).squeeze(1)

    apply.megarl_patched = True
    return apply


def fix_missing_transformer_engine() -> None:
    """Repair megatron-core's paths without TE (idempotent): bind ``te_general_gemm = None`` in the
    MoE utilities so the router takes its torch path instead of raising ``NameError``, tell
    multi-latent attention that TE is absent (it takes TE's mock classes for real ones), and keep
    torch Adam's ``step`` (one tensor per parameter) when loading distributed-optimizer checkpoints."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # Megatron's TE extension imports without TE (its classes are mocks), so multi-latent
    # attention believes TE is there and calls isinstance() with a mock, which raises.
    multi_latent_attention.HAVE_TE = False
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(set_states, "megarl_patched", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _keep_adam_step(set_states)
    if not getattr(DistributedOptimizer.load_state_dict, "megarl_patched", False):
        DistributedOptimizer.load_state_dict = _separate_adam_steps(DistributedOptimizer.load_state_dict)


def _expert_bias_with_padding(apply_expert_bias):
    """``TopKRouter._apply_expert_bias`` with the padding mask ``[tokens]`` as a column, so that it
    leaves the padding out of the tokens counted per expert (megatron-core 0.16.1 ands it with the
    ``[tokens, experts]`` routing map as a row)."""

    @functools.wraps(apply_expert_bias)
    def apply(self, routing_map, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask[:, None]
        return apply_expert_bias(self, routing_map, padding_mask)

    apply.megarl_patched = True
    return apply


def repair_padded_and_packed_paths() -> None:
    """Rotary positions for packed sequences without megatron-core's loop per sample
    (:func:`_packed_rotary`), and the expert-bias count with a padding mask
    (:func:`_expert_bias_with_padding`); idempotent."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.moe.router import TopKRouter

    if not getattr(rope_utils._apply_rotary_pos_emb_thd, "megarl_patched", False):
        rope_utils._apply_rotary_pos_emb_thd = _packed_rotary(rope_utils._apply_rotary_pos_emb_thd)
    if not getattr(TopKRouter._apply_expert_bias, "megarl_patched", False):
        TopKRouter._apply_expert_bias = _expert_bias_with_padding(TopKRouter._apply_expert_bias)


def enable_cpu() -> None:
    """Make megatron-core run on the CPU. Idempotent; refuses to run where CUDA is available."""
    global _enabled, _mode
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megarl.megatron_compat.enable_cpu() is for machines without CUDA; this one has CUDA, "
            "so Megatron runs natively."
        )
    _patch_torch_cuda()
    _patch_megatron()
    _mode = CudaToCpuMode()
    _mode.__enter__()
    _enabled = True


def cpu_enabled() -> bool:
    """Whether :func:`enable_cpu` has run in this process."""
    return _enabled
