"""The policy's sum of squared probabilities (megarl/trainer/sum_pi_squared.py) against the float64
reference: both paths (logits; hidden states and output weight), odd shapes, padded vocabulary
columns, temperatures other than 1, chunks smaller than the problem, extreme rows; and over two
tensor-parallel ranks of real gloo processes (tests/workers/sum_pi_squared_check.py)."""

from __future__ import annotations

import pytest
import torch

from megarl.trainer import sum_pi_squared as module
from megarl.trainer.sum_pi_squared import sum_pi_squared, sum_pi_squared_from_hidden
from tests.distributed import WORKERS, run_torchrun
from tests.workers.sum_pi_squared_check import POISON, reference

TOLERANCES = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=1e-5)}
"""Against the reference on the same (rounded) inputs: the statistics are fp32 whatever the input."""


def poisoned_logits(shape: tuple[int, ...], padded: int, vocab_size: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    logits = scale * torch.randn(*shape, padded, generator=torch.Generator().manual_seed(padded + vocab_size))
    logits[..., vocab_size:] = POISON
    return logits.to(dtype)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize(
    "shape,padded,vocab_size,temperature",
    [((2, 7), 1000, 997, 0.7), ((13,), 61, 61, 1.0), ((3, 1, 5), 256, 151, 1.3), ((1,), 5000, 4999, 0.6)],
)
def test_from_logits_matches_the_float64_reference(shape, padded, vocab_size, temperature, dtype):
    logits = poisoned_logits(shape, padded, vocab_size, dtype)
    found = sum_pi_squared(logits, temperature=temperature, vocab_size=vocab_size)
    assert found.shape == shape and found.dtype == torch.float32
    torch.testing.assert_close(found.double(), reference(logits, vocab_size, temperature), **TOLERANCES[dtype])


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("shape,padded,vocab_size,hidden_size,temperature", [((2, 7), 1000, 997, 24, 0.7), ((3, 1, 5), 256, 151, 13, 1.3)])
def test_from_hidden_states_matches_the_float64_reference(shape, padded, vocab_size, hidden_size, temperature, dtype):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(*shape, hidden_size, generator=generator).to(dtype)
    weight = torch.randn(padded, hidden_size, generator=generator)
    weight[vocab_size:] = POISON
    weight = weight.to(dtype)
    found = sum_pi_squared_from_hidden(hidden, weight, temperature=temperature, vocab_size=vocab_size)
    assert found.shape == shape and found.dtype == torch.float32
    expected = reference(hidden.double() @ weight.double().T, vocab_size, temperature)
    torch.testing.assert_close(found.double(), expected, **TOLERANCES[dtype])


@pytest.mark.cpu
def test_chunks_smaller_than_the_problem_give_the_same_values(monkeypatch):
    """Ragged row and column chunks: the online combination over column chunks is exact."""
    logits = poisoned_logits((5, 7), 1000, 997, torch.float32, scale=8.0)
    hidden = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))
    whole = sum_pi_squared(logits, temperature=0.7, vocab_size=997), sum_pi_squared_from_hidden(hidden, weight, temperature=0.7, vocab_size=997)
    monkeypatch.setattr(module, "CHUNK_ROWS", 4)
    monkeypatch.setattr(module, "CHUNK_COLUMNS", 96)
    chunked = sum_pi_squared(logits, temperature=0.7, vocab_size=997), sum_pi_squared_from_hidden(hidden, weight, temperature=0.7, vocab_size=997)
    for before, after in zip(whole, chunked):
        torch.testing.assert_close(after, before, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(chunked[0].double(), reference(logits, 997, 0.7), atol=1e-6, rtol=1e-5)


@pytest.mark.cpu
def test_uniform_certain_and_huge_rows():
    """1 / V for a uniform row, 1 for a certain one, and no overflow at logits of 1e4."""
    vocab_size = 37
    logits = torch.zeros(4, 40)
    logits[1, 5] = 1e4
    logits[2] = torch.linspace(-1e4, 1e4, 40)
    logits[3] = torch.linspace(-50.0, 50.0, 40)
    logits[:, vocab_size:] = POISON
    found = sum_pi_squared(logits, temperature=0.5, vocab_size=vocab_size)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found[:2], torch.tensor([1 / vocab_size, 1.0]))
    torch.testing.assert_close(found.double(), reference(logits, vocab_size, 0.5), atol=1e-6, rtol=1e-5)


@pytest.mark.cpu
def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"temperature \(0\) must be > 0"):
        sum_pi_squared(torch.zeros(2, 8), temperature=0)
    with pytest.raises(ValueError, match="vocab_size"):
        sum_pi_squared(torch.zeros(2, 8), temperature=1.0, vocab_size=9)
    with pytest.raises(ValueError, match="must share the last dimension H"):
        sum_pi_squared_from_hidden(torch.zeros(2, 4), torch.zeros(8, 5), temperature=1.0)


@pytest.mark.multirank
def test_two_tensor_parallel_ranks():
    result = run_torchrun(WORKERS / "sum_pi_squared_check.py", [], nproc=2, timeout=120)
    for rank in range(2):
        assert f"rank {rank}/2: 4 cases ok" in result.stdout, result.stdout
