"""RL training: ``torchrun --nproc_per_node N -m megarl.train --config FILE [key=value ...]``.

One step (``megarl/trainer/loop.py``; the whole step in ``docs/rl_step.md``)::

    prompts  -> engines.generate   -> samples (response ids, rollout log-probs)   first rank
    samples  -> rewards            -> scores                                      first rank
             -> broadcast to every rank, filters (dynamic sampling) -> batch
    batch    -> policy / reference / critic forward -> old log-probs, ref log-probs, values
    batch    -> reward shaping, advantage estimator, mismatch weights
    batch    -> policy.update (+ critic.update)
    policy   -> weight stream -> engines.update_weights
    metrics  -> console / metrics.jsonl / TensorBoard / W&B; every N steps: validation, checkpoint

This module is the command. It imports nothing heavy: the first rank checks the config and every
input it names (:mod:`megarl.preflight`) in about a second, before torch, Megatron or an engine
starts, and a problem ends the run with one line and exit code 2. Reward workers are spawned
processes that import this module again, and they need none of the rest. Exit codes: see
:mod:`megarl.cli`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from megarl.cli import INTERRUPTED_EXIT_CODE, STOPPED_EXIT_CODE, is_first_rank, parse_run_command, refuse, report, world_size
from megarl.config import Config, ConfigError, load_config
from megarl.nodes import Node

PROGRAM = "megarl.train"

log = logging.getLogger("megarl")


def main(argv: Sequence[str] | None = None) -> int:
    # The run's summary counts from here (time to the first step, wall time).
    launched_at = time.time()
    args = parse_run_command(PROGRAM, "RL training with megarl.", argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        return refuse(PROGRAM, *str(error).splitlines())
    if is_first_rank():
        from megarl.preflight import check_run

        problems = check_run(config, world_size())
        if problems:
            return refuse(PROGRAM, *problems)
    # Errors megarl does not expect go, with their traceback, to torchrun's error file too.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(train)(config, launched_at)


def train(config: Config, launched_at: float) -> int:
    """Build the run and train it; returns the exit code (:mod:`megarl.cli`). ``launched_at``: unix
    time the command started."""
    from megarl.cli import quiet_library_warnings

    quiet_library_warnings()
    started = None
    node = Node.from_env()
    if node.leads:
        # The node's engines come up on the other cores while this process imports Megatron below.
        from megarl.trainer.launch import EarlyStart

        started = EarlyStart(config, config.logging.resolved_run_dir(), node)
    from megarl.agents.environment import EnvironmentLoadError
    from megarl.data.datasets import DataError
    from megarl.models.family import UnsupportedModel
    from megarl.models.loader import CheckpointError as ModelError
    from megarl.rewards.pool import RewardError
    from megarl.rollout.errors import EngineError, EngineMisconfigured
    from megarl.resume import CheckpointError
    from megarl.trainer.loop import Interrupted, TrainingStopped, fit
    from megarl.trainer.run import setup

    try:
        run = setup(config, started, launched_at=launched_at)
    except (ConfigError, DataError, ModelError, UnsupportedModel, CheckpointError, EnvironmentLoadError, EngineMisconfigured) as error:
        # Bad input, named by the message: nothing was trained, nothing saved is touched.
        return refuse(PROGRAM, error)
    except KeyboardInterrupt:
        return report(PROGRAM, ["interrupted before training started"], INTERRUPTED_EXIT_CODE)
    try:
        fit(run)
    except Interrupted as interrupted:
        return report(PROGRAM, [f"{interrupted}; {_where_to_go_on(run)}"], INTERRUPTED_EXIT_CODE)
    except (TrainingStopped, EngineError, RewardError) as error:
        # The run cannot go on; its checkpoints up to the last save are kept.
        return report(PROGRAM, [f"stopped: {error}"], STOPPED_EXIT_CODE)
    finally:
        run.close()
    return 0


def _where_to_go_on(run) -> str:
    """The checkpoint an interrupted run goes on from, and the setting that does it."""
    saved, resume = run.newest_checkpoint(), run.config.checkpoint.resume
    if saved is None:
        return f"no checkpoint of this run was saved (checkpoint.save_every = {run.config.checkpoint.save_every}): it would start over"
    if resume == "auto":
        return f"the last checkpoint is {saved}: run the same command to go on from it (checkpoint.resume=auto)"
    return f"the last checkpoint is {saved}: go on from it with checkpoint.resume=auto (or checkpoint.resume={saved})"


if __name__ == "__main__":
    sys.exit(main())
