"""RL algorithms as registries of pure tensor functions: tensors and masks in, tensors and metric
dicts out; no model, no process group, no global state.

- ``advantages``: advantage estimators (gae, grpo / Dr. GRPO, rloo, reinforce_pp, reinforce_pp_baseline, opo,
  gpg, grpo_passk, remax, optimal_token_baseline)
- ``policy_losses``: per-token policy losses (ppo with clip-higher and dual clip, gspo, cispo, gpg, sapo, gmpo,
  dppo_tv, dppo_kl), entropy bonus
- ``covariance_losses``: clip_cov and kl_cov, in the same registry (imported here, so that the registry is
  complete wherever ``policy_losses`` is imported)
- ``value_loss``: the critic's (clipped) loss
- ``aggregation``: per-token losses -> scalar, exact across micro-batches and parallel ranks
- ``kl``: KL estimators (k1, k2, k3, abs and straight-through k1+, k3+, abs+), KL penalty and loss, coefficient controllers
- ``mismatch``: train/rollout corrections (TIS, ICEPOP, decoupled PPO, sequence-level IS, rejection sampling) and mismatch metrics
- ``shaping``: reward clipping, normalisation, DAPO overlong penalty, dynamic sampling and overlong filters
- ``groups``: per-prompt group statistics; ``registry``: the name -> function registry
"""

from megarl.algorithms import covariance_losses  # noqa: F401  (registers clip_cov and kl_cov)
