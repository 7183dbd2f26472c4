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


def random_case(seed, shape, *, scales, masked, empty_row):
    """``(advantages, old, teacher, mask)``: log-probs in [-scale, 0], a ``masked`` share of tokens
    out of the mask and row ``empty_row`` without a trained token; NaN where the mask is 0, which
    must not leak in."""
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randn(shape, generator=generator)
    old, teacher = (-torch.rand(shape, generator=generator) * scale for scale in scales)
    mask = torch.rand(shape, generator=generator) > masked
    mask[empty_row] = False
    advantages, old, teacher = (torch.where(mask, tensor, float("nan")) for tensor in (advantages, old, teacher))
    return advantages, old, teacher, mask


@pytest.mark.parametrize("task_reward", [True, False])
@pytest.mark.parametrize("kl_coef", [1.0, 0.3])
def test_opd_advantages_follow_the_naive_loop_on_valid_tokens_only(task_reward, kl_coef):
    advantages, old, teacher, mask = random_case(3, (5, 7), scales=(3, 3), masked=0.4, empty_row=0)
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


def naive_leave_one_out(values, mask, group_ids):
    rows, columns = len(mask), len(mask[0])
    out = [[0.0] * columns for _ in range(rows)]
    for i in range(rows):
        for t in range(columns):
            others = [float(values[j][t]) for j in range(rows) if j != i and group_ids[j] == group_ids[i] and mask[j][t]]
            out[i][t] = sum(others) / len(others) if others else 0.0
    return out


def baseline_case(seed):
    # Groups of 4, 3 (one of them empty) and 1, ids neither sorted nor contiguous.
    group_ids = torch.tensor([7, 2, 7, 2, 2, 7, 40, 7, 2])
    return (*random_case(seed, (9, 6), scales=(4, 9), masked=0.3, empty_row=4), group_ids)


@pytest.mark.parametrize("task_reward", [True, False])
def test_the_leave_one_out_baseline_follows_the_naive_loop(task_reward):
    advantages, old, teacher, mask, group_ids = baseline_case(5)
    shaped, metrics = opd_advantages(advantages, old, teacher, mask, kl_coef=0.7, task_reward=task_reward, group_ids=group_ids)
    kl = torch.where(mask, old.double() - teacher.double(), 0.0)
    baseline = naive_leave_one_out(kl.tolist(), mask.tolist(), group_ids.tolist())
    expected = [
        [((float(advantages[i, t]) if task_reward else 0.0) - 0.7 * (float(kl[i, t]) - baseline[i][t])) if mask[i, t] else 0.0 for t in range(mask.shape[1])]
        for i in range(mask.shape[0])
    ]
    torch.testing.assert_close(shaped, torch.tensor(expected), atol=1e-6, rtol=0)
    assert not shaped[~mask].any()
    # The lone response of group 40 has no baseline: its term is the plain one.
    plain, plain_metrics = opd_advantages(advantages, old, teacher, mask, kl_coef=0.7, task_reward=task_reward)
    torch.testing.assert_close(shaped[6], plain[6])
    # The logged reverse KL is the plain estimate, with or without the baseline.
    assert metrics["reverse_kl"].item() == pytest.approx(plain_metrics["reverse_kl"].item())


def test_the_baseline_is_the_same_whatever_the_order_of_the_responses_and_however_whole_groups_are_split():
    advantages, old, teacher, mask, group_ids = baseline_case(8)
    options = dict(kl_coef=1.0, task_reward=True)
    whole, _ = opd_advantages(advantages, old, teacher, mask, group_ids=group_ids, **options)
    order = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled, _ = opd_advantages(advantages[order], old[order], teacher[order], mask[order], group_ids=group_ids[order], **options)
    torch.testing.assert_close(shuffled, whole[order], atol=1e-12, rtol=0)
    # Groups 7 and 40 on one side, group 2 on the other.
    for part in (group_ids != 2, group_ids == 2):
        alone, _ = opd_advantages(advantages[part], old[part], teacher[part], mask[part], group_ids=group_ids[part], **options)
        torch.testing.assert_close(alone, whole[part], atol=1e-12, rtol=0)


def test_the_baseline_removes_what_every_response_of_a_prompt_shares():
    # A teacher that dislikes every sampled first token equally leaves those tokens' advantages at 0.
    old = torch.tensor([[-2.0, -1.0], [-2.0, -3.0], [-2.0, -0.5]])
    teacher = torch.tensor([[-9.0, -1.0], [-9.0, -1.0], [-9.0, -1.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    shaped, _ = opd_advantages(torch.zeros(3, 2), old, teacher, mask, kl_coef=1.0, task_reward=False, group_ids=torch.tensor([0, 0, 0]))
    assert shaped[:, 0].tolist() == [0.0, 0.0, 0.0]
    # Second tokens: k = 0, -2, 0.5; each minus the mean of the other two.
    torch.testing.assert_close(shaped[:, 1], -torch.tensor([0.0 - (-0.75), -2.0 - 0.25, 0.5 - (-1.0)]))
