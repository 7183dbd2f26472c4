"""On-policy distillation's advantages against a naive loop over tokens."""

from __future__ import annotations

import pytest
import torch

from megarl.algorithms.distillation import opd_advantages

pytestmark = pytest.mark.cpu


def naive(advantages, old, teacher, mask, kl_coef, task_reward):
    rows, columns = mask.shape
    out = [[0.0] * columns for _ in range(rows)]
    kls, teacher_values = [], []
    for i in range(rows):
        for t in range(columns):
            if mask[i][t]:
                kl = float(old[i][t]) - float(teacher[i][t])
                out[i][t] = (float(advantages[i][t]) if task_reward else 0.0) - kl_coef * kl
                kls.append(kl)
                teacher_values.append(float(teacher[i][t]))
    return torch.tensor(out), sum(kls) / len(kls), sum(teacher_values) / len(teacher_values)


@pytest.mark.parametrize("task_reward", [True, False])
@pytest.mark.parametrize("kl_coef", [1.0, 0.3])
def test_opd_advantages_follow_the_naive_loop_on_valid_tokens_only(task_reward, kl_coef):
    generator = torch.Generator().manual_seed(3)
    shape = (5, 7)
    advantages = torch.randn(shape, generator=generator)
    old = -torch.rand(shape, generator=generator) * 3
    teacher = -torch.rand(shape, generator=generator) * 3
    mask = torch.rand(shape, generator=generator) > 0.4
    mask[0] = False  # a row without a trained token
    # Garbage where the mask is 0 must not leak in.
    advantages, old, teacher = (torch.where(mask, tensor, float("nan")) for tensor in (advantages, old, teacher))
    shaped, metrics = opd_advantages(advantages, old, teacher, mask, kl_coef=kl_coef, task_reward=task_reward)
    expected, reverse_kl, teacher_mean = naive(advantages, old, teacher, mask, kl_coef, task_reward)
    torch.testing.assert_close(shaped, expected)
    assert shaped.dtype == advantages.dtype and not shaped[~mask].any()
    assert metrics["reverse_kl"].item() == pytest.approx(reverse_kl) and metrics["teacher_log_prob"].item() == pytest.approx(teacher_mean)


def test_a_teacher_that_agrees_with_the_policy_leaves_the_task_advantages_alone():
    advantages = torch.tensor([[0.5, -1.0, 0.0]])
    log_probs = torch.tensor([[-0.2, -1.5, -0.7]])
    mask = torch.tensor([[True, True, False]])
    shaped, metrics = opd_advantages(advantages, log_probs, log_probs, mask, kl_coef=1.0, task_reward=True)
    assert shaped.tolist() == [[0.5, -1.0, 0.0]] and metrics["reverse_kl"].item() == 0
    alone, _ = opd_advantages(advantages, log_probs, log_probs - 1.0, mask, kl_coef=2.0, task_reward=False)
    assert alone.tolist() == [[-2.0, -2.0, 0.0]]
