"""The scorer a run uses, from its ``reward`` config section."""

from __future__ import annotations

from megarl.config import RewardConfig
from megarl.rewards.inline import InlineScorer
from megarl.rewards.pool import RewardPool
from megarl.rewards.remote import RemoteReward


def build_scorer(config: RewardConfig) -> RewardPool | InlineScorer | RemoteReward:
    """A remote client for ``reward.type = remote``; otherwise the rule, the user function or the
    reward model, scored in an isolated worker pool or, where ``reward.isolation`` resolves to
    ``none``, in the training process. All have ``score(samples) -> ScoredBatch``."""
    if config.type == "remote":
        return RemoteReward(
            config.url,
            batch_size=config.remote_batch_size,
            retries=config.remote_retries,
            timeout_s=config.timeout_s,
            max_failure_rate=config.max_failure_rate,
        )
    target = {"rule": config.rule, "function": config.function, "model": config.model_path}[config.type]
    if config.resolved_isolation() == "none":
        return InlineScorer(config.type, target, config.max_failure_rate, batched=config.batched)
    return RewardPool(config.type, target, config.num_workers, config.timeout_s, config.max_failure_rate, batched=config.batched)
