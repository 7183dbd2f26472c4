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
