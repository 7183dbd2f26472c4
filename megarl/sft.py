"""Supervised fine-tuning: ``torchrun --nproc_per_node N -m megarl.sft --config FILE [key=value ...]``.

Trains the model of ``model.path`` on chat-format conversations (``data.train_files``, one
``{"messages": [...]}`` a row), the loss on the assistant tokens only, on the RL trainer's stack
(:mod:`megarl.trainer.sft`): the same layouts, packing, optimizer, checkpoints, conversion tools
and metrics. The config's sections are in :mod:`megarl.config.sft`. As ``megarl.train`` does, the
first rank checks the config and the inputs it names (:func:`megarl.preflight.check_sft_run`)
before torch or Megatron is imported; a config, dataset or checkpoint problem ends the run with one
line per problem and exit code 2; exit codes: see :mod:`megarl.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megarl.cli import INTERRUPTED_EXIT_CODE, STOPPED_EXIT_CODE, is_first_rank, parse_run_command, refuse, report, world_size
from megarl.config import ConfigError, load_config
from megarl.config.sft import SFTConfig

PROGRAM = "megarl.sft"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_run_command(PROGRAM, "Supervised fine-tuning with megarl.", argv)
    try:
        config = load_config(args.config, args.overrides, root=SFTConfig)
    except ConfigError as error:
        return refuse(PROGRAM, *str(error).splitlines())
    if is_first_rank():
        from megarl.preflight import check_sft_run

        problems = check_sft_run(config, world_size())
        if problems:
            return refuse(PROGRAM, *problems)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fine_tune)(config)


def fine_tune(config: SFTConfig) -> int:
    """Build the run and train it; returns the exit code (:mod:`megarl.cli`)."""
    from megarl.cli import quiet_library_warnings

    quiet_library_warnings()
    from megarl.resume import CheckpointError
    from megarl.data.datasets import DataError
    from megarl.models.family import UnsupportedModel
    from megarl.models.loader import CheckpointError as ModelError
    from megarl.trainer.sft import NonFiniteSteps, fit_sft, setup_sft

    try:
        run = setup_sft(config)
    except (ConfigError, DataError, ModelError, UnsupportedModel, CheckpointError) as error:
        return refuse(PROGRAM, error)
    except KeyboardInterrupt:
        return report(PROGRAM, ["interrupted before training started"], INTERRUPTED_EXIT_CODE)
    try:
        fit_sft(run)
    except KeyboardInterrupt:
        return report(PROGRAM, ["interrupted: run the same command to go on from the last checkpoint (checkpoint.resume=auto)"], INTERRUPTED_EXIT_CODE)
    except NonFiniteSteps as error:
        return report(PROGRAM, [f"stopped: {error}"], STOPPED_EXIT_CODE)
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
