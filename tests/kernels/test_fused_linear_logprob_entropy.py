"""``megarl.kernels.fused_linear_logprob_entropy`` against the float64 reference.

As ``test_logprob_entropy.py``, for ``hidden @ weight.T``: values and the gradients of both
``hidden`` and ``weight``, on the Triton kernels (compiled on CUDA, interpreted on CPU tensors)
and the torch path. The 37-row case has H = 40 (not a multiple of the 16-deep interpreter K
block) and 1000 vocabulary rows (two 512-column splits and grad chunks, the last ragged) whose
last 3 are padding; the torch path runs it in one product and in row and column chunks. The
tensor-parallel group over real processes is in ``test_tensor_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch

from megarl.kernels import fused_linear_logprob_entropy as module
from megarl.kernels import fused_linear_logprob_entropy_triton as kernels_module
from megarl.kernels import logprob_entropy as logits_module
from megarl.kernels import matmul_accumulate
from megarl.kernels.common import combine_partial_stats, interpreter_block_v
from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy
from megarl.kernels.fused_linear_logprob_entropy_triton import grad_chunk_columns
from tests.kernels.reference import (
    TEMPERATURE,
    TOLERANCES,
    Problem,
    assert_matches,
    fused_reference,
    fused_rounding_bounds,
    logprob_entropy_reference,
    make_problem,
)

pytestmark = pytest.mark.cpu

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("torch", "cpu", id="torch"), pytest.param("triton", TRITON_DEVICE, id="triton")]
DTYPES = [pytest.param(dtype, atol, rtol, id=str(dtype)[6:]) for dtype, (atol, rtol) in TOLERANCES.items()]

VOCAB, PADDING, HIDDEN = 1000, 3, 40
QWEN_VOCAB, QWEN_PADDED, TP = 151936, 152064, 3  # padded to a multiple of 128 x TP
QWEN_HIDDEN = 16  # one whole interpreter K block: the unmasked (EVEN_K) path


def reference(problem: Problem):
    """Float64 ``(log_probs, entropy, dL/dhidden, dL/dweight, dL/dlogits)``."""
    hidden = problem.hidden.detach().double().requires_grad_()
    weight = problem.weight.detach().double().requires_grad_()
    logits = hidden @ weight.T
    logits.retain_grad()
    log_probs, entropy = logprob_entropy_reference(logits, problem.targets, problem.vocab_size)
    problem.loss(log_probs, entropy).backward()
    return log_probs, entropy, hidden.grad, weight.grad, logits.grad


def test_interpreter_runs_the_kernels_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the kernels are compiled")
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (kernels_module._stats_kernel, kernels_module._grad_logits_kernel,
                   matmul_accumulate._matmul_accumulate_kernel):
        assert isinstance(kernel.fn, InterpretedFunction)  # under the EVEN_K heuristic
    assert HIDDEN % kernels_module.INTERPRETER_BLOCK_K and HIDDEN > kernels_module.INTERPRETER_BLOCK_K, "a ragged K loop"
    chunk = kernels_module.INTERPRETER_BLOCKS_PER_CHUNK * interpreter_block_v(VOCAB - PADDING)
    assert (VOCAB - PADDING) % chunk and VOCAB - PADDING > chunk, "several splits and grad chunks, the last ragged"


def test_grad_chunk_fills_the_fixed_workspace():
    bf16 = 2
    assert grad_chunk_columns(16384, 151936, bf16) == 8192  # 256 MiB of bf16 logit gradients
    assert grad_chunk_columns(8192, 151936, bf16) == 16384
    assert grad_chunk_columns(100, 151936, bf16) == 151936  # a short micro-batch: one chunk
    assert grad_chunk_columns(1 << 20, 151936, bf16) == kernels_module.COLUMN_ALIGN  # never below one tile


def check_public_function(problem: Problem, backend: str, device: str, atol: float, rtol: float) -> None:
    """Run ``fused_linear_logprob_entropy`` on ``problem`` and compare values and gradients."""
    hidden = problem.hidden.to(device, copy=True).requires_grad_()
    weight = problem.weight.to(device, copy=True).requires_grad_()
    log_probs, entropy = fused_linear_logprob_entropy(
        hidden, weight, problem.targets.to(device),
        temperature=TEMPERATURE, vocab_size=problem.vocab_size, backend=backend,
    )
    problem.loss(log_probs.cpu(), entropy.cpu()).backward()

    expected_log_probs, expected_entropy, expected_grad_hidden, expected_grad_weight, grad_logits = reference(problem)
    assert_matches(log_probs, expected_log_probs, atol, rtol)
    assert_matches(entropy, expected_entropy, atol, rtol)
    rounding_hidden = rounding_weight = None
    if problem.hidden.dtype == torch.bfloat16:
        rounding_hidden, rounding_weight = fused_rounding_bounds(problem.hidden, problem.weight, grad_logits)
    assert_matches(hidden.grad, expected_grad_hidden, atol, rtol, rounding_hidden)
    assert_matches(weight.grad, expected_grad_weight, atol, rtol, rounding_weight)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n_rows", [1, 37])
def test_matches_reference(backend, device, dtype, atol, rtol, n_rows):
    problem = make_problem(n_rows, VOCAB, VOCAB - PADDING, dtype, hidden_size=HIDDEN)
    check_public_function(problem, backend, device, atol, rtol)


def test_torch_path_in_row_and_column_chunks(monkeypatch):
    # 256-column, 16-row chunks: 4 column chunks (the last one ragged) x 3 row chunks (the last ragged).
    monkeypatch.setattr(module, "TORCH_CHUNK_COLUMNS", 256)
    monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", 256 * 16)
    monkeypatch.setattr(logits_module, "TORCH_CHUNK_ELEMENTS", 256 * 16)
    problem = make_problem(37, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    check_public_function(problem, "torch", "cpu", *TOLERANCES[torch.float32])


def test_auto_backend_runs_torch_on_cpu_tensors(monkeypatch):
    """The trainer calls with ``backend="auto"``: on CPU tensors the kernels must not run."""

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on CPU tensors")

    monkeypatch.setattr(module, "stats_triton", fail)
    monkeypatch.setattr(module, "backward_triton", fail)
    problem = make_problem(5, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    check_public_function(problem, "auto", "cpu", *TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tied_embedding_gets_both_gradients(backend, device):
    """The output layer's weight is also the input embedding: its gradient sums both uses."""
    n_rows = 37
    problem = make_problem(n_rows, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB - PADDING, (n_rows,), generator=generator)
    mix = torch.randn(HIDDEN, HIDDEN, generator=generator) / HIDDEN**0.5

    def tied_model_loss(weight, head):
        """Embed ``input_ids`` with ``weight``, mix, and score the result with ``head`` on ``weight``."""
        hidden = torch.tanh(torch.nn.functional.embedding(input_ids.to(weight.device), weight) @ mix.to(weight))
        log_probs, entropy = head(hidden, weight)
        return problem.loss(log_probs.cpu(), entropy.cpu())

    def kernel_head(hidden, weight):
        return fused_linear_logprob_entropy(
            hidden, weight, problem.targets.to(device),
            temperature=TEMPERATURE, vocab_size=problem.vocab_size, backend=backend,
        )

    def reference_head(hidden, weight):
        return fused_reference(hidden, weight, problem.targets, problem.vocab_size)

    weight = problem.weight.to(device, copy=True).requires_grad_()
    tied_model_loss(weight, kernel_head).backward()
    expected = problem.weight.double().requires_grad_()
    tied_model_loss(expected, reference_head).backward()
    assert_matches(weight.grad, expected.grad, *TOLERANCES[torch.float32])


def check_over_shards(problem: Problem, n_shards: int, backend: str, device: str, atol: float, rtol: float) -> None:
    """Split ``problem``'s weight into ``n_shards`` vocabulary shards and check values and gradients.

    The stats pass on every shard, what the all-reduces compute, then each shard's finalize, as
    tensor-parallel ranks do; the hidden gradient accumulates every shard's part, as the public
    function's all-reduce does.
    """
    dtype = problem.hidden.dtype
    shard_rows = problem.weight.shape[0] // n_shards
    hidden = problem.hidden.to(device, copy=True).requires_grad_()
    targets = problem.targets.to(device)
    shards = [shard.to(device).requires_grad_() for shard in problem.weight.split(shard_rows)]
    options = [(rank * shard_rows, problem.vocab_size, TEMPERATURE, backend) for rank in range(n_shards)]
    partial = [
        torch.ops.megarl.fused_linear_logprob_entropy_stats(hidden.detach(), shard.detach(), targets, *opts)
        for shard, opts in zip(shards, options)
    ]
    stats = combine_partial_stats(torch.stack(partial))
    expected_log_probs, expected_entropy, expected_grad_hidden, expected_grad_weight, grad_logits = reference(problem)
    for shard, opts in zip(shards, options):
        log_probs, entropy = torch.ops.megarl.fused_linear_logprob_entropy_finalize(hidden, shard, targets, stats, *opts)
        assert_matches(log_probs, expected_log_probs, atol, rtol)
        assert_matches(entropy, expected_entropy, atol, rtol)
        problem.loss(log_probs.cpu(), entropy.cpu()).backward()
    rounding_hidden = rounding_weight = None
    if dtype == torch.bfloat16:
        rounding_hidden, rounding_weight = fused_rounding_bounds(problem.hidden, problem.weight, grad_logits)
    assert_matches(hidden.grad, expected_grad_hidden, atol, rtol, rounding_hidden)
    assert_matches(torch.cat([shard.grad for shard in shards]), expected_grad_weight, atol, rtol, rounding_weight)


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
    problem = make_problem(2, QWEN_PADDED, QWEN_VOCAB, dtype, hidden_size=QWEN_HIDDEN)
    check_over_shards(problem, TP, backend, device, *TOLERANCES[dtype])


def record_logit_blocks(monkeypatch) -> dict[str, list[tuple[int, int]]]:
    """Record the shape of every block of logits the torch path forms: ``{"stats": [...], "grad": [...]}``."""
    blocks = {"stats": [], "grad": []}
    for key, name in (("stats", "partial_stats_torch"), ("grad", "grad_logits_torch")):

        def spy(logits, *args, original=getattr(module, name), shapes=blocks[key]):
            shapes.append(tuple(logits.shape))
            return original(logits, *args)

        monkeypatch.setattr(module, name, spy)
    return blocks


# 37 rows of 997 valid columns, by (TORCH_CHUNK_COLUMNS, TORCH_CHUNK_ELEMENTS,
# TORCH_ONE_PASS_ELEMENTS): one product at exactly the one-pass budget; one element over it, chunks
# of 36 rows (36, then 1); one column over the chunk's columns, the vocabulary split (996, then 1).
FUSED_ONE_PASS_AND_CHUNKED = [
    pytest.param(997, 36 * 997, 37 * 997, [(37, 997)], id="one-pass"),
    pytest.param(997, 36 * 997, 37 * 997 - 1, [(36, 997), (1, 997)], id="row-chunks"),
    pytest.param(996, 37 * 996, 37 * 997, [(37, 996), (37, 1)], id="column-chunks"),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("chunk_columns,chunk_elements,one_pass_elements,blocks", FUSED_ONE_PASS_AND_CHUNKED)
def test_torch_path_takes_one_product_when_the_logits_are_small(
    monkeypatch, dtype, atol, rtol, chunk_columns, chunk_elements, one_pass_elements, blocks
):
    monkeypatch.setattr(module, "TORCH_CHUNK_COLUMNS", chunk_columns)
    monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(module, "TORCH_ONE_PASS_ELEMENTS", one_pass_elements)
    formed = record_logit_blocks(monkeypatch)
    problem = make_problem(37, VOCAB, VOCAB - PADDING, dtype, hidden_size=HIDDEN)
    check_public_function(problem, "torch", "cpu", atol, rtol)
    assert formed == {"stats": blocks, "grad": blocks}


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "chunk_columns,chunk_elements,blocks",
    [
        pytest.param(None, None, [(37, 334), (37, 334), (37, 329)], id="one-pass"),
        # 128 columns and 16 rows a chunk: columns 128, 128 and the rest (78, or 73 valid on the
        # last shard), each in rows 16, 16, 5.
        pytest.param(
            128, 128 * 16,
            [(rows, cols) for last in (78, 78, 73) for cols in (128, 128, last) for rows in (16, 16, 5)],
            id="row-and-column-chunks",
        ),
    ],
)
def test_torch_path_over_three_shards(monkeypatch, dtype, atol, rtol, chunk_columns, chunk_elements, blocks):
    """1002 vocabulary rows (a multiple of 3) over 3 shards of 334, the last 5 padding, on either path."""
    if chunk_columns is not None:
        monkeypatch.setattr(module, "TORCH_CHUNK_COLUMNS", chunk_columns)
        monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", chunk_elements)
    formed = record_logit_blocks(monkeypatch)
    problem = make_problem(37, 1002, VOCAB - PADDING, dtype, hidden_size=HIDDEN)
    check_over_shards(problem, 3, "torch", "cpu", atol, rtol)
    assert formed == {"stats": blocks, "grad": blocks}


def test_leading_dimensions_and_one_used_output():
    problem = make_problem(6, VOCAB, VOCAB, torch.float32, hidden_size=HIDDEN)
    problem.grad_entropy.zero_()
    hidden = problem.hidden.view(2, 3, HIDDEN).clone().requires_grad_()
    weight = problem.weight.clone().requires_grad_()
    log_probs, entropy = fused_linear_logprob_entropy(hidden, weight, problem.targets.view(2, 3), temperature=TEMPERATURE)
    assert log_probs.shape == entropy.shape == (2, 3)
    (problem.grad_log_probs.view(2, 3) * log_probs).sum().backward()

    expected_log_probs, _, expected_grad_hidden, expected_grad_weight, _ = reference(problem)
    tolerance = TOLERANCES[torch.float32]
    assert_matches(log_probs.flatten(), expected_log_probs, *tolerance)
    assert_matches(hidden.grad.view(6, HIDDEN), expected_grad_hidden, *tolerance)
    assert_matches(weight.grad, expected_grad_weight, *tolerance)


def test_ops_pass_opcheck():
    problem = make_problem(5, VOCAB, VOCAB - PADDING, torch.float32, hidden_size=HIDDEN)
    hidden, weight, targets = problem.hidden.requires_grad_(), problem.weight.requires_grad_(), problem.targets
    options = (0, problem.vocab_size, TEMPERATURE, "torch")
    stats = torch.ops.megarl.fused_linear_logprob_entropy_stats(hidden.detach(), weight.detach(), targets, *options)
    log_sum_exp = stats[0] + stats[1].log()
    torch.library.opcheck(
        torch.ops.megarl.fused_linear_logprob_entropy_stats.default, (hidden.detach(), weight.detach(), targets, *options)
    )
    torch.library.opcheck(
        torch.ops.megarl.fused_linear_logprob_entropy_finalize.default, (hidden, weight, targets, stats, *options)
    )
    torch.library.opcheck(
        torch.ops.megarl.fused_linear_logprob_entropy_backward.default,
        (hidden.detach(), weight.detach(), targets, log_sum_exp, problem.grad_entropy, problem.grad_log_probs,
         problem.grad_entropy, *options),
    )


def test_rejects_bad_arguments():
    problem = make_problem(4, VOCAB, VOCAB, torch.float32, hidden_size=HIDDEN)
    hidden, weight, targets = problem.hidden, problem.weight, problem.targets
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprob_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprob_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprob_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_logprob_entropy(hidden, weight, targets, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprob_entropy(hidden, weight, targets, backend="cuda")
