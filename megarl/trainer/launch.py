"""What the first rank starts before it imports Megatron and builds the model: the rollout engines
and the reward scorer.

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

from megarl.config import DTYPE_NAMES, Config, resolve_model_path
from megarl.rewards.scorer import build_scorer
from megarl.rollout.group import EngineGroup


class EarlyStart:
    """The engines, launching on a background thread, and the scorer (first rank).

    Args:
        config: the run's config (checked).
        run_dir: the run directory; the engines' logs go to its ``engines/``.
    """

    def __init__(self, config: Config, run_dir: Path):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="megarl-engine-start")
        self._engines = self._executor.submit(
            EngineGroup.from_config, config.rollout, resolve_model_path(config.model.path),
            log_dir=run_dir / "engines", dtype=DTYPE_NAMES[config.model.dtype],
        )
        self._executor.shutdown(wait=False)
        self.scorer: Any = build_scorer(config.reward)
        """The reward scorer (``score(samples) -> ScoredBatch``)."""

    def engines(self) -> EngineGroup:
        """The engine group, once every engine is healthy.

        Raises:
            EngineStartError: an engine did not come up (the others were stopped).
        """
        return self._engines.result()

    def close(self) -> None:
        """Stop what was started, for a set-up that fails before the run owns it: waits for the
        engines' start to end, then shuts them down."""
        with contextlib.suppress(Exception):
            self._engines.result().shutdown()
        with contextlib.suppress(Exception):
            if hasattr(self.scorer, "close"):
                self.scorer.close()
