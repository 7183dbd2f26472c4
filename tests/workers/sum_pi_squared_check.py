"""The sum of squared probabilities over a real tensor-parallel group (torchrun worker: gloo, CPU
tensors), and the float64 reference the single-process tests use too
(``from tests.workers.sum_pi_squared_check import reference``).

Every rank builds the same problem, a vocabulary padded to ``PADDED_VOCAB`` columns whose padding
holds logits (or weight rows) that would dominate any sum they entered, and runs both functions on
its own shard with ``group=WORLD``: from the logits and from the hidden states with the output
weight's rows. With ``VOCAB = 1000`` every rank holds real columns; with ``VOCAB = 300`` over two
ranks of 512 columns the second rank holds only padding. Prints one ``ok`` line per rank when
every case matched the reference on the whole problem.
"""

from __future__ import annotations

import torch

PADDED_VOCAB, HIDDEN, TEMPERATURE = 1024, 24, 0.7
POISON = 40.0
"""In the padded columns (logits, or each element of the weight rows behind them)."""


def reference(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """sum_v softmax(z)_v^2 in float64 over the first ``vocab_size`` columns, z = logits / temperature."""
    probabilities = torch.softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    return probabilities.square().sum(dim=-1)


def problem(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [3, 5, PADDED_VOCAB], hidden [3, 5, HIDDEN], weight [PADDED_VOCAB, HIDDEN])``, fp32,
    the padded columns poisoned."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 5, PADDED_VOCAB, generator=generator)
    logits[..., vocab_size:] = POISON
    hidden = torch.randn(3, 5, HIDDEN, generator=generator)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=generator)
    weight[vocab_size:] = POISON
    return logits, hidden, weight


def main() -> None:
    import torch.distributed as dist

    from megarl.trainer.sum_pi_squared import sum_pi_squared, sum_pi_squared_from_hidden

    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        columns = slice(rank * PADDED_VOCAB // world_size, (rank + 1) * PADDED_VOCAB // world_size)
        cases = 0
        for vocab_size in (1000, 300):
            logits, hidden, weight = problem(vocab_size, seed=vocab_size)
            options = dict(temperature=TEMPERATURE, vocab_size=vocab_size, group=dist.group.WORLD)
            from_logits = sum_pi_squared(logits[..., columns], **options)
            from_hidden = sum_pi_squared_from_hidden(hidden, weight[columns], **options)
            torch.testing.assert_close(from_logits.double(), reference(logits, vocab_size, TEMPERATURE), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(from_hidden.double(), reference(hidden.double() @ weight.double().T, vocab_size, TEMPERATURE), atol=1e-6, rtol=1e-5)
            cases += 2
        print(f"rank {rank}/{world_size}: {cases} cases ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
