"""``megarl.kernels.logprob_entropy`` against the float64 reference: values and gradients.

Both implementations run: the Triton kernels (compiled on CUDA, or under Triton's interpreter on
CPU tensors, see conftest.py) and the torch path, in one pass and in row chunks. Shapes: one row
and 37 rows over 1000 columns (not a multiple of the 256-column interpreter block) whose last 3
are vocabulary padding; and Qwen's 151936-token vocabulary padded to 152064 (a multiple of 128 x
3) over 3 tensor-parallel ranks, emulated in one process by combining each shard's partial
statistics (real processes over gloo: ``test_tensor_parallel.py``).
"""

from __future__ import annotations

import pytest
import torch

from megarl.kernels import logprob_entropy as module
from megarl.kernels.common import combine_partial_stats
from megarl.kernels.logprob_entropy import logprob_entropy
from tests.kernels.reference import (
    TEMPERATURE,
    TOLERANCES,
    Problem,
    assert_matches,
    logprob_entropy_reference,
    make_problem,
)

pytestmark = pytest.mark.cpu

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("torch", "cpu", id="torch"), pytest.param("triton", TRITON_DEVICE, id="triton")]
DTYPES = [pytest.param(dtype, atol, rtol, id=str(dtype)[6:]) for dtype, (atol, rtol) in TOLERANCES.items()]

VOCAB, PADDING = 1000, 3
QWEN_VOCAB, TP = 151936, 3
QWEN_PADDED = 152064  # next multiple of 128 x TP


def reference(problem: Problem):
    """Float64 ``(log_probs, entropy, dL/dlogits)``."""
    logits = problem.logits.detach().double().requires_grad_()
    log_probs, entropy = logprob_entropy_reference(logits, problem.targets, problem.vocab_size)
    problem.loss(log_probs, entropy).backward()
    return log_probs, entropy, logits.grad


def test_interpreter_runs_the_kernels_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the kernels are compiled")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(module._stats_kernel, InterpretedFunction)
    assert isinstance(module._backward_kernel, InterpretedFunction)
    assert VOCAB % module.interpreter_block_v(VOCAB) != 0, "the ragged last block must be exercised"


def check_public_function(problem: Problem, backend: str, device: str, atol: float, rtol: float) -> None:
    """Run ``logprob_entropy`` on ``problem`` and compare values and the logits' gradient."""
    logits = problem.logits.to(device, copy=True).requires_grad_()
    log_probs, entropy = logprob_entropy(
        logits, problem.targets.to(device), temperature=TEMPERATURE, vocab_size=problem.vocab_size, backend=backend
    )
    problem.loss(log_probs.cpu(), entropy.cpu()).backward()

    expected_log_probs, expected_entropy, expected_grad = reference(problem)
    assert_matches(log_probs, expected_log_probs, atol, rtol)
    assert_matches(entropy, expected_entropy, atol, rtol)
    assert_matches(logits.grad, expected_grad, atol, rtol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n_rows", [1, 37])
def test_matches_reference(backend, device, dtype, atol, rtol, n_rows):
    check_public_function(make_problem(n_rows, VOCAB, VOCAB - PADDING, dtype), backend, device, atol, rtol)


def test_torch_path_in_row_chunks(monkeypatch):
    monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", 16 * VOCAB)  # 16-row chunks, the last ragged
    check_public_function(make_problem(37, VOCAB, VOCAB - PADDING, torch.float32), "torch", "cpu",
                          *TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_peaked_and_flat_rows(backend, device):
    """A row whose mass sits on one token (p underflows to 0 elsewhere, entropy 0) and a flat row
    (entropy log V) stay finite and exact, values and gradients."""
    problem = make_problem(2, VOCAB, VOCAB - PADDING, torch.float32)
    problem.logits[0, :] = -5e3
    problem.logits[0, problem.targets[0]] = 5e3
    problem.logits[1, : problem.vocab_size] = 7.0
    check_public_function(problem, backend, device, *TOLERANCES[torch.float32])


def test_auto_backend_runs_torch_on_cpu_tensors(monkeypatch):
    """The trainer calls with ``backend="auto"``: on CPU tensors the kernels must not run."""

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on CPU tensors")

    monkeypatch.setattr(module, "_stats_triton", fail)
    monkeypatch.setattr(module, "_backward_triton", fail)
    check_public_function(make_problem(5, VOCAB, VOCAB - PADDING, torch.float32), "auto", "cpu",
                          *TOLERANCES[torch.float32])


def check_over_shards(problem: Problem, n_shards: int, backend: str, device: str, atol: float, rtol: float) -> None:
    """Split ``problem``'s logits into ``n_shards`` vocabulary shards and check values and gradients.

    The stats pass on every shard (no autograd: finalize's backward carries the whole derivative),
    then what the all-reduces compute, then each shard's finalize, as tensor-parallel ranks do.
    """
    shard_cols = problem.logits.shape[1] // n_shards
    targets = problem.targets.to(device)
    shards = [shard.to(device).requires_grad_() for shard in problem.logits.split(shard_cols, dim=1)]
    options = [(rank * shard_cols, problem.vocab_size, TEMPERATURE, backend) for rank in range(n_shards)]
    partial = [
        torch.ops.megarl.logprob_entropy_stats(shard.detach(), targets, *opts) for shard, opts in zip(shards, options)
    ]
    stats = combine_partial_stats(torch.stack(partial))
    expected_log_probs, expected_entropy, expected_grad = reference(problem)
    for shard, opts in zip(shards, options):
        log_probs, entropy = torch.ops.megarl.logprob_entropy_finalize(shard, targets, stats, *opts)
        assert_matches(log_probs, expected_log_probs, atol, rtol)
        assert_matches(entropy, expected_entropy, atol, rtol)
        problem.loss(log_probs.cpu(), entropy.cpu()).backward()
    assert_matches(torch.cat([shard.grad for shard in shards], dim=1), expected_grad, atol, rtol)


@pytest.mark.parametrize(
    "backend,device,dtype",
    [
        pytest.param("torch", "cpu", torch.float32, id="torch-float32"),
        pytest.param("torch", "cpu", torch.bfloat16, id="torch-bfloat16"),
        # The interpreter needs seconds per shard here: one dtype, the one training uses.
        pytest.param("triton", TRITON_DEVICE, torch.bfloat16, id="triton-bfloat16"),
    ],
)
def test_qwen_vocab_over_three_ranks(backend, device, dtype):
    problem = make_problem(2, QWEN_PADDED, QWEN_VOCAB, dtype)
    check_over_shards(problem, TP, backend, device, *TOLERANCES[dtype])


def count_row_passes(monkeypatch) -> dict[str, list[int]]:
    """Record the rows of every pass of the torch path: ``{"stats": [rows, ...], "grad": [...]}``."""
    passes = {"stats": [], "grad": []}
    for key, name in (("stats", "_stats_of_rows"), ("grad", "_grad_of_rows")):

        def spy(logits, *args, original=getattr(module, name), rows=passes[key]):
            rows.append(logits.shape[0])
            return original(logits, *args)

        monkeypatch.setattr(module, name, spy)
    return passes


# 37 rows of 997 valid columns: the whole fp32 logits fit a budget of 37 x 997 elements (one pass);
# one element less leaves room for 36 rows a chunk (a chunk of 36, then 1).
ONE_PASS_AND_CHUNKED = [
    pytest.param(37 * (VOCAB - PADDING), [37], id="one-pass"),
    pytest.param(37 * (VOCAB - PADDING) - 1, [36, 1], id="row-chunks"),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("chunk_elements,rows_per_pass", ONE_PASS_AND_CHUNKED)
def test_torch_path_takes_one_pass_when_the_logits_fit(monkeypatch, dtype, atol, rtol, chunk_elements, rows_per_pass):
    monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", chunk_elements)
    passes = count_row_passes(monkeypatch)
    check_public_function(make_problem(37, VOCAB, VOCAB - PADDING, dtype), "torch", "cpu", atol, rtol)
    assert passes == {"stats": rows_per_pass, "grad": rows_per_pass}


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "chunk_elements,rows_per_pass",
    [
        pytest.param(None, [37] * 3, id="one-pass"),
        # 16 rows of a shard's 334 (or, on the last shard, 329 valid) columns a chunk: 16, 16, 5.
        pytest.param(16 * 334, [16, 16, 5] * 3, id="row-chunks"),
    ],
)
def test_torch_path_over_three_shards(monkeypatch, dtype, atol, rtol, chunk_elements, rows_per_pass):
    """1002 columns (a multiple of 3) over 3 shards of 334, the last 5 padding, on either path."""
    if chunk_elements is not None:
        monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", chunk_elements)
    passes = count_row_passes(monkeypatch)
    check_over_shards(make_problem(37, 1002, VOCAB - PADDING, dtype), 3, "torch", "cpu", atol, rtol)
    assert passes == {"stats": rows_per_pass, "grad": rows_per_pass}


def test_leading_dimensions_and_one_used_output():
    problem = make_problem(6, VOCAB, VOCAB, torch.float32)
    problem.grad_log_probs.zero_()
    logits = problem.logits.view(2, 3, VOCAB).clone().requires_grad_()
    log_probs, entropy = logprob_entropy(logits, problem.targets.view(2, 3), temperature=TEMPERATURE)
    assert log_probs.shape == entropy.shape == (2, 3)
    (problem.grad_entropy.view(2, 3) * entropy).sum().backward()

    _, expected_entropy, expected_grad = reference(problem)
    assert_matches(entropy.flatten(), expected_entropy, *TOLERANCES[torch.float32])
    assert_matches(logits.grad.view(6, VOCAB), expected_grad, *TOLERANCES[torch.float32])


def test_ops_pass_opcheck():
    problem = make_problem(5, VOCAB, VOCAB - PADDING, torch.float32)
    logits, targets = problem.logits.requires_grad_(), problem.targets
    options = (0, problem.vocab_size, TEMPERATURE, "torch")
    stats = torch.ops.megarl.logprob_entropy_stats(logits.detach(), targets, *options)
    log_sum_exp = stats[0] + stats[1].log()
    torch.library.opcheck(torch.ops.megarl.logprob_entropy_stats.default, (logits.detach(), targets, *options))
    torch.library.opcheck(torch.ops.megarl.logprob_entropy_finalize.default, (logits, targets, stats, *options))
    torch.library.opcheck(
        torch.ops.megarl.logprob_entropy_backward.default,
        (logits.detach(), targets, log_sum_exp, problem.grad_entropy, problem.grad_log_probs, problem.grad_entropy,
         *options),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "cuda"}, "backend"),
        ({"vocab_size": VOCAB + 1}, "vocab_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    problem = make_problem(4, VOCAB, VOCAB, torch.float32)
    with pytest.raises(ValueError, match=message):
        logprob_entropy(problem.logits, problem.targets, **kwargs)
    with pytest.raises(ValueError, match="targets"):
        logprob_entropy(problem.logits, problem.targets[:3])
