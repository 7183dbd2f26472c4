"""The learning-rate schedule: linear warm-up from 0, then constant, linear or cosine decay to
``min_lr`` at the run's last optimizer step."""

from __future__ import annotations

import math
import types

import pytest

from megarl.config import OptimizerConfig
from megarl.trainer.optim import build_scheduler

pytestmark = pytest.mark.cpu

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 2, 10


def learning_rates(style: str) -> list[float]:
    optimizer = types.SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(optimizer, OptimizerConfig(lr=LR, min_lr=MIN_LR), style=style, warmup_steps=WARMUP, total_steps=TOTAL)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(TOTAL):
        scheduler.step(increment=1)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_warmup_then_decay(style):
    rates = learning_rates(style)
    assert rates[:3] == pytest.approx([0.0, LR / 2, LR])
    if style == "constant":
        assert rates[3:] == pytest.approx([LR] * (TOTAL - 2))
        return
    assert rates[-1] == pytest.approx(MIN_LR)
    middle = (WARMUP + TOTAL) // 2
    progress = (middle - WARMUP) / (TOTAL - WARMUP)
    expected = MIN_LR + (LR - MIN_LR) * (1 - progress if style == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
    assert rates[middle] == pytest.approx(expected)
    assert all(earlier >= later for earlier, later in zip(rates[2:], rates[3:]))


def test_adam_steps_all_tensors_together_with_the_same_arithmetic():
    import torch

    from megarl.trainer.optim import _step_tensors_together

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7), (1,)]
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(4)]

    def trained(together: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(value.clone()) for value in initial]
        adam = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if together:
            _step_tensors_together(types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=adam)]))
            assert all(group["foreach"] for group in adam.param_groups)
        for step_gradients in gradients:
            for param, gradient in zip(params, step_gradients):
                param.grad = gradient.clone()
            adam.step()
        return [param.detach() for param in params]

    for one_by_one, together in zip(trained(False), trained(True)):
        assert torch.equal(one_by_one, together)
