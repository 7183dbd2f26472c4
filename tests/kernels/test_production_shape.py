"""Both ops on the paths production takes (issue 24), against the float64 reference, run twice and
compared bitwise.

On a GPU (marked ``gpu``): N = 600 tokens, H = 256, a 33000-token vocabulary padded to 33024 and
split over two emulated tensor-parallel ranks (each shard's stats, then what the all-reduces
compute, then each shard's finalize and backward, the hidden gradient summed over the shards as
the backward's all-reduce sums it), bf16, the grad workspace shrunk so that each shard's
backward takes 5 chunks. Under the interpreter on the CPU the same code paths at shapes that fit:
H = 16 (one whole 16-deep K block: the ``EVEN_K`` path); 40 rows (three 16-row blocks, the last
ragged, in groups of two: the last group ragged too); 1780 tokens padded to 1792 over two shards
of 896 rows, in grad chunks and stats splits of one 256-column block (4 of each a shard, the last
tile ragged, 12 padded rows on the second shard). The logits op, which has no chunks and one
program per row and column block, runs on 8 rows of 997 tokens padded to 1000. Also the
peaked/flat-row check of the fused op (``test_logprob_entropy.py`` has the logits op's).
"""

from __future__ import annotations

import pytest
import torch

from megarl.kernels import fused_linear_logprob_entropy_triton as kernels_module
from megarl.kernels.common import combine_partial_stats, interpreter_block_v
from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy
from tests.kernels.reference import (
    TEMPERATURE,
    TOLERANCES,
    Problem,
    assert_matches,
    fused_rounding_bounds,
    logprob_entropy_reference,
    make_problem,
)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TP = 2

# (rows, hidden, vocab_size, padded vocabulary, grad workspace bytes): 5 grad chunks of 4096
# columns per GPU shard (16512 rows); the interpreter's chunks are 2 column blocks whatever the workspace.
GPU_SHAPE = (600, 256, 33000, 33024, 600 * 2 * 4096)
INTERPRETER_SHAPE = (40, 16, 1780, 1792, None)


def reference(problem: Problem):
    """Float64 ``(log_probs, entropy, grads of the inputs..., dL/dlogits)`` of either op's problem."""
    inputs = [tensor.detach().double().requires_grad_() for tensor in (
        (problem.logits,) if problem.hidden is None else (problem.hidden, problem.weight)
    )]
    logits = inputs[0] if problem.hidden is None else inputs[0] @ inputs[1].T
    if problem.hidden is not None:
        logits.retain_grad()
    log_probs, entropy = logprob_entropy_reference(logits, problem.targets, problem.vocab_size)
    problem.loss(log_probs, entropy).backward()
    return log_probs, entropy, [tensor.grad for tensor in inputs], logits.grad


def run_over_ranks(problem: Problem, device: str) -> list[torch.Tensor]:
    """Both ops' three steps over ``TP`` emulated ranks: ``[log_probs, entropy, *input grads]``.

    The stats op on every shard, the reduced stats (``combine_partial_stats`` computes what the
    all-reduces do), each shard's finalize and backward; the shared ``hidden``'s gradient
    accumulates every shard's part, as the all-reduce of the public function sums them.
    """
    targets = problem.targets.to(device).int()
    if problem.hidden is None:
        shards = [shard.contiguous().to(device).requires_grad_() for shard in problem.logits.chunk(TP, dim=1)]
        stats_op, finalize_op = torch.ops.megarl.logprob_entropy_stats, torch.ops.megarl.logprob_entropy_finalize
        shared = []
    else:
        hidden = problem.hidden.to(device, copy=True).requires_grad_()
        shards = [shard.to(device, copy=True).requires_grad_() for shard in problem.weight.chunk(TP, dim=0)]
        stats_op = torch.ops.megarl.fused_linear_logprob_entropy_stats
        finalize_op = torch.ops.megarl.fused_linear_logprob_entropy_finalize
        shared = [hidden]
    width = shards[0].shape[-1 if problem.hidden is None else 0]
    options = [(rank * width, problem.vocab_size, TEMPERATURE, "triton") for rank in range(TP)]
    stats = combine_partial_stats(torch.stack([
        stats_op(*(tensor.detach() for tensor in shared), shard.detach(), targets, *opts)
        for shard, opts in zip(shards, options)
    ]))
    outputs = []
    for shard, opts in zip(shards, options):
        log_probs, entropy = finalize_op(*shared, shard, targets, stats, *opts)
        problem.loss(log_probs.cpu(), entropy.cpu()).backward()
        outputs.append((log_probs, entropy))
    assert all(torch.equal(outputs[0][0], other[0]) and torch.equal(outputs[0][1], other[1]) for other in outputs)
    weights = torch.cat([shard.grad for shard in shards], dim=1 if problem.hidden is None else 0)
    return [tensor.cpu() for tensor in (*outputs[0], *(tensor.grad for tensor in shared), weights)]


def check_production_shape(problem: Problem, device: str) -> None:
    """Values and gradients against float64 (bf16 tolerances plus the bound of G's rounding), and
    a second run equal bit for bit."""
    first, second = run_over_ranks(problem, device), run_over_ranks(problem, device)
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {index} differs between two identical runs"
    log_probs, entropy, grads, grad_logits = reference(problem)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert_matches(first[0], log_probs, atol, rtol)
    assert_matches(first[1], entropy, atol, rtol)
    bounds = [None] if problem.hidden is None else fused_rounding_bounds(problem.hidden, problem.weight, grad_logits)
    for actual, expected, bound in zip(first[2:], grads, bounds):
        assert_matches(actual, expected, atol, rtol, bound)


def fused_problem(shape) -> Problem:
    n_rows, hidden_size, vocab_size, padded, _ = shape
    return make_problem(n_rows, padded, vocab_size, torch.bfloat16, hidden_size=hidden_size)


def logits_problem(shape) -> Problem:
    n_rows, _, vocab_size, padded, _ = shape
    if shape is INTERPRETER_SHAPE:
        # One interpreted program per row and 256-column block, no chunks: 8 rows of 997 tokens
        # padded to 1000 (two shards of 500: two blocks each, the last ragged, 3 padded columns).
        n_rows, vocab_size, padded = 8, 997, 1000
    return make_problem(n_rows, padded, vocab_size, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [logits_problem, fused_problem], ids=["logits", "fused"])
def test_production_shape_on_gpu(monkeypatch, make):
    monkeypatch.setattr(kernels_module, "GRAD_WORKSPACE_BYTES", GPU_SHAPE[4])
    n_rows, _, _, padded, _ = GPU_SHAPE
    shard_rows = padded // TP
    chunks = -(-shard_rows // kernels_module.grad_chunk_columns(n_rows, shard_rows, 2))
    assert chunks >= 4, chunks
    check_production_shape(make(GPU_SHAPE), "cuda")


@pytest.mark.cpu
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's shapes: the GPU test covers CUDA")
@pytest.mark.parametrize("make", [logits_problem, fused_problem], ids=["logits", "fused"])
def test_production_shape_under_the_interpreter(monkeypatch, make):
    monkeypatch.setattr(kernels_module, "INTERPRETER_BLOCKS_PER_CHUNK", 1)
    n_rows, hidden_size, vocab_size, padded, _ = INTERPRETER_SHAPE
    shard_rows = padded // TP
    chunk = kernels_module.INTERPRETER_BLOCKS_PER_CHUNK * interpreter_block_v(shard_rows)
    assert hidden_size % kernels_module.INTERPRETER_BLOCK_K == 0, "the EVEN_K path"
    assert n_rows > 2 * kernels_module.INTERPRETER_BLOCK_N and n_rows % kernels_module.INTERPRETER_BLOCK_N
    assert -(-(vocab_size - shard_rows) // chunk) >= 4 and shard_rows % interpreter_block_v(shard_rows)
    assert padded > vocab_size > shard_rows  # padded rows on the last shard only
    check_production_shape(make(INTERPRETER_SHAPE), "cpu")


@pytest.mark.cpu
@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
def test_fused_peaked_and_flat_rows(backend, device):
    """The fused op on a row whose mass sits on one token (logits -5e3 but +5e3 at the target) and
    on a flat row (entropy log V), values and both gradients, fp32."""
    vocab_size, padded, hidden_size = 997, 1000, 40
    problem = make_problem(3, padded, vocab_size, torch.float32, hidden_size=hidden_size)
    problem.hidden[:2] = 0.0
    problem.hidden[0, 0] = problem.hidden[1, 1] = 1.0
    problem.weight[:vocab_size, :2] = torch.tensor([-5e3, 7.0])
    problem.weight[problem.targets[0], 0] = 5e3
    hidden = problem.hidden.to(device, copy=True).requires_grad_()
    weight = problem.weight.to(device, copy=True).requires_grad_()
    log_probs, entropy = fused_linear_logprob_entropy(
        hidden, weight, problem.targets.to(device), temperature=TEMPERATURE, vocab_size=vocab_size, backend=backend
    )
    problem.loss(log_probs.cpu(), entropy.cpu()).backward()
    expected_log_probs, expected_entropy, (grad_hidden, grad_weight), _ = reference(problem)
    assert abs(float(expected_entropy[0])) < 1e-9 and abs(float(expected_entropy[1]) - torch.log(torch.tensor(997.0))) < 1e-6
    atol, rtol = TOLERANCES[torch.float32]
    for actual, expected in ((log_probs, expected_log_probs), (entropy, expected_entropy),
                             (hidden.grad, grad_hidden), (weight.grad, grad_weight)):
        assert torch.isfinite(actual).all()
        assert_matches(actual, expected, atol, rtol)
