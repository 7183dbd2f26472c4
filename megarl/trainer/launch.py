"""What the first rank starts before it imports Megatron and builds the model: the rollout engines,
the reward scorer and (``agent.environment``) the environment workers.

An engine is a process of its own that imports torch and its model library, loads the model and
only then answers its health check; launched after the trainer's model was built, its start-up
(seconds on a CPU) was time every rank spent waiting. :class:`EarlyStart` launches the engines on
a background thread as soon as the config is checked, so that they come up on the machine's other
cores while the training processes import Megatron and build their shards;
:func:`megarl.trainer.run.setup` waits for them only where it hands them to the run. The scorer
(worker processes that import the reward function, or an in-process rule) starts at the same time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path
from typing import Any

from megarl.agents.workers import EnvironmentPool
from megarl.config import DTYPE_NAMES, AgentConfig, Config, resolve_model_path
from megarl.rewards.scorer import build_scorer
from megarl.rollout.group import EngineGroup


class EarlyStart:
    """The engines, launching on a background thread, and the scorer (first rank).

    Args:
        config: the run's config (checked).
        run_dir: the run directory; the engines' logs go to its ``engines/``.
    """

    def __init__(self, config: Config, run_dir: Path):
        self._executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="megarl-engine-start")
        self._engines = self._executor.submit(
            EngineGroup.from_config, config.rollout, resolve_model_path(config.model.path),
            log_dir=run_dir / "engines", dtype=DTYPE_NAMES[config.model.dtype],
        )
        self._environments = self._executor.submit(start_environments, config.agent) if config.agent.enabled else None
        self._executor.shutdown(wait=False)
        self.scorer: Any = build_scorer(config.reward)
        """The reward scorer (``score(samples) -> ScoredBatch``)."""

    def engines(self) -> EngineGroup:
        """The engine group, once every engine is healthy.

        Raises:
            EngineStartError: an engine did not come up (the others were stopped).
        """
        return self._engines.result()

    def environments(self) -> EnvironmentPool | None:
        """The environment workers of ``agent.environment``, once they loaded it; None without one.

        Raises:
            EnvironmentLoadError: the environment cannot be loaded (the workers were stopped).
        """
        return None if self._environments is None else self._environments.result()

    def tool_schemas(self) -> list[dict]:
        """The environment's tool declarations (none without an environment)."""
        environments = self.environments()
        return [] if environments is None else environments.tool_schemas()

    def close(self) -> None:
        """Stop what was started, for a set-up that fails before the run owns it: waits for the
        engines' start to end, then shuts them down."""
        with contextlib.suppress(Exception):
            self._engines.result().shutdown()
        with contextlib.suppress(Exception):
            if self._environments is not None:
                self._environments.result().close()
        with contextlib.suppress(Exception):
            if hasattr(self.scorer, "close"):
                self.scorer.close()


def start_environments(agent: AgentConfig) -> EnvironmentPool:
    """The environment workers ``agent`` asks for."""
    import megarl.agents.toy  # noqa: F401 - registers the bundled environments

    return EnvironmentPool(agent.environment, env_kwargs=agent.environment_kwargs(), num_workers=agent.num_workers, step_timeout_s=agent.step_timeout_s)
