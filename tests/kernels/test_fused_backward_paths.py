"""The fused op's backward variants (issue 24): ``dX`` through torch's matmul or the Triton kernel
(``MEGARL_FUSED_DX``), ``dX`` / ``dW`` skipped when not needed, int32 targets, the kernels' TMA and
persistent variants under the interpreter, and the autotuning knobs (``MEGARL_AUTOTUNE``, the
token-count bucket, the pruning of TMA configurations on unaligned operands)."""

from __future__ import annotations

import pytest
import torch

from megarl.kernels import common
from megarl.kernels import fused_linear_logprob_entropy as module
from megarl.kernels import fused_linear_logprob_entropy_triton as kernels_module
from megarl.kernels import logprob_entropy as logits_module
from megarl.kernels import matmul_accumulate
from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy
from tests.kernels.reference import IGNORED_TARGET, TEMPERATURE, TOLERANCES, make_problem
from tests.kernels.test_fused_linear_logprob_entropy import HIDDEN, PADDING, VOCAB, check_public_function, reference

pytestmark = pytest.mark.cpu

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Two 16-row interpreter blocks, the last ragged (the interpreter's cost is per program); one
# block where the rows do not matter.
ROWS = 20
FEW_ROWS = 5


@pytest.mark.parametrize("mode,dtype", [
    pytest.param("cublas", torch.bfloat16, id="cublas-bfloat16"),
    pytest.param("triton", torch.bfloat16, id="triton-bfloat16"),
])
def test_dx_paths_match_the_reference(monkeypatch, mode, dtype):
    monkeypatch.setenv(matmul_accumulate.FUSED_DX_ENV, mode)
    taken = []

    def spy(*args, original=matmul_accumulate.accumulate_product, **kwargs):
        taken.append(original(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(kernels_module, "accumulate_product", spy)
    problem = make_problem(ROWS, VOCAB, VOCAB - PADDING, dtype, hidden_size=HIDDEN)
    check_public_function(problem, "triton", TRITON_DEVICE, *TOLERANCES[dtype])
    if mode == "triton":
        expected = {"triton"}
    elif dtype == torch.float32:
        expected = {"fp32"}
    elif TRITON_DEVICE == "cpu":
        expected = {"upcast"}  # no fp32-result bf16 matmul on the CPU
    else:
        expected = {matmul_accumulate.torch_accumulate(torch.device("cuda"), dtype) or "triton"}
    assert set(taken) == expected and len(taken) == 2, taken  # two grad chunks


def test_fp32_operands_take_the_plain_product(monkeypatch):
    monkeypatch.setenv(matmul_accumulate.FUSED_DX_ENV, "cublas")
    generator = torch.Generator().manual_seed(0)
    a, b, acc = (torch.randn(*shape, generator=generator) for shape in ((5, 7), (7, 3), (5, 3)))
    expected = acc.double() + a.double() @ b.double()
    assert matmul_accumulate.accumulate_product(acc, a, b, rows_bucket=256, triton_options={}) == "fp32"
    torch.testing.assert_close(acc.double(), expected, atol=1e-5, rtol=1e-5)


def test_bad_dx_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(matmul_accumulate.FUSED_DX_ENV, "cutlass")
    with pytest.raises(ValueError, match="MEGARL_FUSED_DX='cutlass'.*'cublas'.*'triton'"):
        matmul_accumulate.dx_mode()


def test_probe_answers_what_runs():
    """The probe names a matmul that really gives fp32 sums on this machine, or none."""
    answer = matmul_accumulate.torch_accumulate(torch.device(TRITON_DEVICE), torch.bfloat16)
    assert answer in (None, "addmm", "mm")
    if TRITON_DEVICE == "cpu":
        assert answer is None  # aten::mm.dtype has no CPU kernel in torch 2.13


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_a_gradient_not_needed_is_not_computed(monkeypatch, backend, device, frozen):
    calls = []
    for name in ("backward_triton", "_backward_torch"):

        def spy(*args, original=getattr(module, name)):
            calls.append(args[-2:])
            return original(*args)

        monkeypatch.setattr(module, name, spy)
    products = []
    monkeypatch.setattr(kernels_module, "accumulate_product", lambda *args, **kwargs: products.append("dX"))
    problem = make_problem(FEW_ROWS, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    hidden = problem.hidden.to(device, copy=True).requires_grad_(frozen != "hidden")
    weight = problem.weight.to(device, copy=True).requires_grad_(frozen != "weight")
    log_probs, entropy = fused_linear_logprob_entropy(
        hidden, weight, problem.targets.to(device), temperature=TEMPERATURE, vocab_size=problem.vocab_size,
        backend=backend,
    )
    problem.loss(log_probs.cpu(), entropy.cpu()).backward()
    assert calls == [(frozen != "hidden", frozen != "weight")]
    assert products == [] or frozen != "hidden"
    _, _, expected_hidden, expected_weight, _ = reference(problem)
    atol, rtol = TOLERANCES[torch.float32]
    if frozen == "hidden":
        assert hidden.grad is None
        torch.testing.assert_close(weight.grad.cpu().double(), expected_weight, atol=atol, rtol=rtol)
    else:
        assert weight.grad is None and len(products) == (2 if backend == "triton" else 0)


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
def test_targets_reach_the_ops_as_int32_and_huge_ids_stay_ignored(monkeypatch, backend, device):
    seen = []
    name = "stats_triton" if backend == "triton" else "_stats_torch"

    def spy(hidden, weight, targets, *options, original=getattr(module, name)):
        seen.append(targets.dtype)
        return original(hidden, weight, targets, *options)

    monkeypatch.setattr(module, name, spy)
    problem = make_problem(FEW_ROWS, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    huge = problem.targets.clone()
    huge[0], huge[4] = 2**40, -(2**40)  # wrap to valid ids if narrowed before the range check
    ignored = problem.targets.clone()
    ignored[0] = ignored[4] = IGNORED_TARGET
    hidden, weight = problem.hidden.to(device), problem.weight.to(device)
    options = dict(temperature=TEMPERATURE, vocab_size=problem.vocab_size, backend=backend)
    got = fused_linear_logprob_entropy(hidden, weight, huge.to(device), **options)
    expected = fused_linear_logprob_entropy(hidden, weight, ignored.to(device), **options)
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted, atol=0, rtol=0)
    assert got[0][0] == 0 and got[0][4] == 0
    assert seen == [torch.int32, torch.int32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's variants; on CUDA the autotuner picks")
@pytest.mark.parametrize("variant", [
    pytest.param({"USE_TMA": True, "PERSISTENT": False}, id="tma"),
    pytest.param({"USE_TMA": False, "PERSISTENT": True}, id="persistent"),
])
def test_tma_and_persistent_variants_match_the_reference(monkeypatch, variant):
    # 2 row blocks x 2 column blocks a chunk, 2 chunks: 4 tiles a chunk over 3 persistent programs
    # (one loops twice); TMA's zero fill stands in for the wrapped rows and columns past the ends.
    monkeypatch.setattr(kernels_module, "INTERPRETER_VARIANT", variant)
    problem = make_problem(ROWS, VOCAB, VOCAB - PADDING, torch.bfloat16, hidden_size=HIDDEN)
    check_public_function(problem, "triton", "cpu", *TOLERANCES[torch.bfloat16])


def test_autotune_lists_trimmed_by_the_environment(monkeypatch):
    monkeypatch.setenv(common.AUTOTUNE_ENV, "all")
    every = kernels_module._grad_configs()
    assert len(every) > 1 and {(c.kwargs["USE_TMA"], c.kwargs["PERSISTENT"]) for c in every} == {
        (False, False), (True, False), (False, True), (True, True),
    }
    assert any(config.kwargs["USE_TMA"] for config in kernels_module._stats_configs())
    monkeypatch.setenv(common.AUTOTUNE_ENV, "first")
    for make in (kernels_module._stats_configs, kernels_module._grad_configs, matmul_accumulate._accumulate_configs,
                 logits_module._stats_configs, logits_module._backward_configs):
        first = make()
        assert len(first) == 1 and not first[0].kwargs.get("USE_TMA") and not first[0].kwargs.get("PERSISTENT")
    assert kernels_module._grad_configs()[0].kwargs == every[0].kwargs
    monkeypatch.setenv(common.AUTOTUNE_ENV, "best")
    with pytest.raises(ValueError, match="MEGARL_AUTOTUNE='best'.*'all'.*'first'"):
        kernels_module._stats_configs()


def test_autotune_keys_include_the_token_bucket():
    assert [common.rows_bucket(n) for n in (1, 100, 256, 257, 600, 16384, 10**6)] == [
        256, 256, 256, 512, 1024, 16384, 16384,
    ]
    for kernel in (kernels_module._stats_kernel_tuned, kernels_module._grad_logits_kernel_tuned,
                   matmul_accumulate._matmul_accumulate_kernel_tuned, logits_module._stats_kernel_tuned,
                   logits_module._backward_kernel_tuned):
        assert "rows_bucket" in kernel.keys


def test_unaligned_operands_prune_the_tma_configurations():
    configs = [*kernels_module._grad_configs()]
    kept = kernels_module._without_unaligned_tma(configs, {"tma_aligned": 0})
    assert kept and not any(config.kwargs["USE_TMA"] for config in kept)
    assert kernels_module._without_unaligned_tma(configs, {"tma_aligned": 1}) == configs
    weight = torch.zeros(8, 40, dtype=torch.bfloat16)
    shifted = torch.zeros(8 * 40 + 1, dtype=torch.bfloat16)[1:].view(8, 40)  # starts 2 bytes in
    assert kernels_module._tma_aligned(weight) and not kernels_module._tma_aligned(shifted)
    assert not kernels_module._tma_aligned(torch.zeros(4, 7, dtype=torch.bfloat16))  # 14-byte rows
