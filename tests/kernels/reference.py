"""Float64 references for the kernel tests, the inputs they run on, and the tolerances.

The references are the naive definitions: the full logits, ``log_softmax`` over the real
vocabulary, a gather for the target and ``-sum p log p``; gradients come from autograd on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A target id outside the vocabulary (padding): log-prob 0 and no log-prob gradient.
IGNORED_TARGET = -100

# Put in the padded vocabulary columns (the logits, or the weight rows behind them): a padded
# column that entered a sum would dominate it.
POISON = 30.0

TEMPERATURE = 0.7

# dtype -> (atol, rtol) against the float64 reference on the same (rounded) inputs, for log-probs,
# entropy and gradients. fp32: fp32 arithmetic over up to 152k terms; the largest measured error
# is 0.43 of the tolerance (dX summed over a 152k vocabulary). bf16: the statistics stay
# fp32-accurate, but the gradients are rounded to bf16 (2^-8 relative), and in the fused kernels
# the logit gradients G are too before the dX / dW products, so dX carries up to
# 2^-8 x sum_j |G_j| |W_j| and dW up to 2^-8 x sum_n |G_n| |x_n| (fused_rounding_bounds); under the
# interpreter the largest measured error was 0.89 of (atol, rtol) alone, on an H200 (tensor cores,
# cuBLAS's bf16 dW) one element of dW went past it, within the bound.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 8e-3),
}


BF16_UNIT_ROUNDOFF = 2.0**-8
"""bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself."""


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, rounding: torch.Tensor | None = None
) -> None:
    """``|actual - expected| <= atol + rtol |expected|`` elementwise, plus ``rounding`` where given: a
    per-element bound on what the kernel's documented roundings add (see ``fused_rounding_bounds``)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().double()
    if rounding is None:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    allowed = atol + rtol * expected.abs() + rounding
    excess = (actual - expected).abs() / allowed
    worst = int(excess.argmax())
    assert excess.max() <= 1, (
        f"{int((excess > 1).sum())} of {excess.numel()} elements past the tolerance; the worst, flat index {worst}: "
        f"actual {actual.flatten()[worst]:.6g}, expected {expected.flatten()[worst]:.6g}, "
        f"allowed +-{allowed.flatten()[worst]:.3g} (of which rounding {rounding.flatten()[worst]:.3g})"
    )


def logprob_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """``logits: [N, V_padded]`` -> ``(log_probs [N], entropy [N])`` in float64."""
    log_p = torch.log_softmax(logits.double()[:, :vocab_size] / TEMPERATURE, dim=-1)
    valid = (targets >= 0) & (targets < vocab_size)
    target_log_p = log_p.gather(1, targets.clamp(0, vocab_size - 1)[:, None])[:, 0]
    return torch.where(valid, target_log_p, 0.0), -(log_p.exp() * log_p).sum(dim=-1)


def fused_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """``hidden: [N, H]``, ``weight: [V_padded, H]`` -> ``(log_probs [N], entropy [N])`` in float64."""
    return logprob_entropy_reference(hidden.double() @ weight.double().T, targets, vocab_size)


def fused_rounding_bounds(
    hidden: torch.Tensor, weight: torch.Tensor, grad_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on what rounding the logit gradients ``G = dL/dlogits`` to bf16 before the products
    adds to ``dL/dhidden = G W`` and ``dL/dweight = G^T X``: ``2^-8 |G| |W|`` and ``2^-8 |G|^T |X|``."""
    magnitude = grad_logits.double().abs()
    return (
        BF16_UNIT_ROUNDOFF * magnitude @ weight.double().abs(),
        BF16_UNIT_ROUNDOFF * magnitude.T @ hidden.double().abs(),
    )


@dataclass
class Problem:
    """One test problem over the whole (padded) vocabulary; ``loss`` weighs both outputs."""

    targets: torch.Tensor  # [N] global ids, one of them IGNORED_TARGET
    vocab_size: int
    grad_log_probs: torch.Tensor  # [N] dL/dlog_probs
    grad_entropy: torch.Tensor  # [N] dL/dentropy
    logits: torch.Tensor | None = None  # [N, V_padded]
    hidden: torch.Tensor | None = None  # [N, H]
    weight: torch.Tensor | None = None  # [V_padded, H]

    def loss(self, log_probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return (self.grad_log_probs * log_probs + self.grad_entropy * entropy).sum()


def make_problem(n_rows: int, padded_vocab: int, vocab_size: int, dtype: torch.dtype, hidden_size: int | None = None,
                 seed: int = 0) -> Problem:
    """Random logits (or hidden states and weight) with a spread like a model's; padding poisoned."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab_size, (n_rows,), generator=generator)
    if n_rows > 1:
        targets[n_rows // 2] = IGNORED_TARGET
    problem = Problem(
        targets=targets,
        vocab_size=vocab_size,
        grad_log_probs=torch.randn(n_rows, generator=generator),
        grad_entropy=torch.randn(n_rows, generator=generator),
    )
    if hidden_size is None:
        logits = 3 * torch.randn(n_rows, padded_vocab, generator=generator)
        logits[:, vocab_size:] = POISON
        problem.logits = logits.to(dtype)
    else:
        weight = 3 * torch.randn(padded_vocab, hidden_size, generator=generator) / hidden_size**0.5
        weight[vocab_size:] = POISON / hidden_size**0.5
        problem.hidden = torch.randn(n_rows, hidden_size, generator=generator).abs().to(dtype)
        problem.weight = weight.to(dtype)
    return problem
