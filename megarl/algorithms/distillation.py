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

Departures, all deliberate: none in the maths. slime has no switch for pure distillation (its
examples return a 0 reward instead); ``opd_task_reward`` false is that switch, keeping the real
reward for the logs. Padding and masked tokens get exactly 0.
"""

from __future__ import annotations

import torch


def opd_advantages(
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    task_reward: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The advantages with the distillation term (module docstring).

    Args:
        advantages: ``[B, T]`` the estimator's advantages (read only when ``task_reward``).
        old_log_probs: ``[B, T]`` the sampling policy's log-prob of each token.
        teacher_log_probs: ``[B, T]`` the teacher's log-prob of the same tokens.
        response_mask: ``[B, T]`` 1 (or true) on the trained response tokens.
        kl_coef: c, the weight of the reverse-KL term.
        task_reward: keep the estimator's advantage and add the term (else the term alone).

    Returns:
        ``(advantages [B, T], metrics)``: the advantages in ``advantages``' dtype, 0 where the mask
        is 0; ``reverse_kl`` (the mean of k_t over valid tokens) and ``teacher_log_prob`` (the mean
        teacher log-prob over valid tokens), 0-d tensors (0 without a valid token).
    """
    valid = response_mask.bool()
    reverse_kl = torch.where(valid, old_log_probs.double() - teacher_log_probs.double(), 0.0)
    base = torch.where(valid, advantages.double(), 0.0) if task_reward else torch.zeros_like(reverse_kl)
    shaped = (base - kl_coef * reverse_kl).to(advantages.dtype)
    count = valid.sum().clamp(min=1)
    metrics = {
        "reverse_kl": reverse_kl.sum() / count,
        "teacher_log_prob": torch.where(valid, teacher_log_probs.double(), 0.0).sum() / count,
    }
    return shaped, metrics
