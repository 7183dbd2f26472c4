"""On-policy distillation (OPD): the student samples, a teacher scores the sampled tokens, and the
per-token reverse KL to the teacher becomes part of the advantage.

With pi the policy (its log-probs the trainer's ``old_log_probs``: the sampling policy in synchronous
rollouts, the weights before the update in asynchronous ones, as slime), pi_T the teacher,
y_t the sampled token and c = ``algorithm.opd_kl_coef``, on every valid token t:

    k_t = log pi(y_t | y_<t) - log pi_T(y_t | y_<t)        (the sampled-token estimate of KL(pi || pi_T))
    A_t <- A_t - c k_t        (``algorithm.opd_task_reward`` true: added to the estimator's advantage)
    A_t  = -c k_t             (false: distillation alone; the task reward is still scored and logged)

Minimising the reverse KL E_pi[log pi - log pi_T] by the policy gradient gives each sampled token
the advantage -(log pi - log pi_T) (Agarwal et al. 2024, GKD, on-policy case; Thinking Machines,
"On-Policy Distillation", 2025), which the PPO loss then trains like any advantage: the term is a
constant of the update, no gradient flows through it. This is slime's ``apply_opd_kl_to_advantages``
(``--use-opd``, ``--opd-kl-coef``), whose student log-probs are also the trainer's old log-probs.

With ``algorithm.opd_baseline`` ``leave_one_out``, k_t is first centred on the same position's
values in the other responses to the same prompt (responses j != i of the group, valid at t):

    k_t(i) <- k_t(i) - mean_{j != i} k_t(j)

The baseline does not depend on response i's tokens (a group's responses are drawn independently),
so the expected gradient is unchanged while its variance falls: without it every token the teacher
finds unlikely (log-prob about -9 for a random student's tokens) gets a large negative advantage and
the policy gradient mostly pushes the sampled tokens down; with it a token is rewarded or punished
relative to what the policy's other samples got at that position (at the first response token,
whose state is the prompt for all of them, this is the classic per-state baseline). On the bundled
toy task at coefficient 1 it took the steps to a mean reward of 0.8 from 127 to 64 - 83 over three
seeds (docs/benchmarks.md, "Algorithm breadth (issue 23)").

Departures, all deliberate: none in the maths of the default. slime has no switch for pure
distillation (its examples return a 0 reward instead); ``opd_task_reward`` false is that switch,
keeping the real reward for the logs. slime has no baseline (``opd_baseline`` ``none``, the default,
is its behaviour). Padding and masked tokens get exactly 0.
"""

from __future__ import annotations

import torch

from megarl.algorithms.groups import leave_one_out_token_means


def opd_advantages(
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    task_reward: bool,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The advantages with the distillation term (module docstring).

    Args:
        advantages: ``[B, T]`` the estimator's advantages (read only when ``task_reward``).
        old_log_probs: ``[B, T]`` the sampling policy's log-prob of each token.
        teacher_log_probs: ``[B, T]`` the teacher's log-prob of the same tokens.
        response_mask: ``[B, T]`` 1 (or true) on the trained response tokens.
        kl_coef: c, the weight of the reverse-KL term.
        task_reward: keep the estimator's advantage and add the term (else the term alone).
        group_ids: ``[B]`` the prompt each response answers, to centre k_t on the leave-one-out
            mean of its group (``opd_baseline`` ``leave_one_out``); None: no baseline.

    Returns:
        ``(advantages [B, T], metrics)``: the advantages in ``advantages``' dtype, 0 where the mask
        is 0; ``reverse_kl`` (the mean of k_t over valid tokens) and ``teacher_log_prob`` (the mean
        teacher log-prob over valid tokens), 0-d tensors (0 without a valid token).
    """
    valid = response_mask.bool()
    reverse_kl = torch.where(valid, old_log_probs.double() - teacher_log_probs.double(), 0.0)
    base = torch.where(valid, advantages.double(), 0.0) if task_reward else torch.zeros_like(reverse_kl)
    term = reverse_kl
    if group_ids is not None:
        term = reverse_kl - leave_one_out_token_means(reverse_kl, valid, group_ids)
    shaped = torch.where(valid, base - kl_coef * term, 0.0).to(advantages.dtype)
    count = valid.sum().clamp(min=1)
    metrics = {
        "reverse_kl": reverse_kl.sum() / count,
        "teacher_log_prob": torch.where(valid, teacher_log_probs.double(), 0.0).sum() / count,
    }
    return shaped, metrics

