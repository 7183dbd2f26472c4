"""What megarl's command-line programs share: how they end (and how the conversion tools check a
layout and finish).

Exit codes (of the program itself; ``torchrun`` exits with 1 whenever a worker fails, whatever its
code, and its "Root Cause" block quotes the worker's message):

- 0: done.
- 1: the run started but cannot go on (non-finite gradients step after step, engines that keep
  failing, a reward function that fails on most samples); checkpoints up to the last save are kept.
- 2: bad input (a config, a data file, a reward function, a model directory, a checkpoint, a layout
  that does not fit): one line per problem naming the file or option and what to do, no traceback,
  nothing saved is touched.
- 130: interrupted (Ctrl-C); the line names the last checkpoint.

Under ``torchrun`` the first rank prints the message (every rank exits), and it also goes to torch
elastic's error file, so that torchrun's "Root Cause" block shows it instead of "To enable
traceback see".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from megarl.config import LayoutSpelling, ModelFacts, ParallelConfig, layout_errors

STOPPED_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130

LAYOUT_FLAGS = LayoutSpelling(
    {
        "tensor": "--tp", "pipeline": "--pp", "virtual_pipeline": "--vpp", "expert": "--ep", "expert_tensor": "--etp",
        # The conversion tools have no flags for these: no context parallelism, and sequence
        # parallelism whenever TP > 1 (it changes no weight).
        "context": "context parallel", "sequence_parallel": "sequence parallel",
    },
    separator=" ",
    unset="drop {name}",
)
"""How the conversion tools (tools/convert_*.py) spell the layout in their messages."""

QUIET_WARNINGS = (
    # megarl picks the torch fallbacks on purpose and says which layers it uses.
    ".*(Transformer Engine|Apex).* not installed.*",
    # Deprecations inside megatron-core's own calls, not actionable by a user.
    ".*all_gather_into_tensor.* is deprecated.*",
    ".*reduce_scatter_tensor.* is deprecated.*",
    "full scope is deprecated.*",
)


def quiet_library_warnings() -> None:
    """Silence the libraries' warnings that are noise to a megarl user (:data:`QUIET_WARNINGS`)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def parse_run_command(program: str, description: str, argv) -> argparse.Namespace:
    """The command line of megarl's run commands (``--config FILE key.sub=value ...``), and their
    logging: megarl's own messages on the first rank; from libraries (Megatron lists every
    parameter at INFO), warnings only."""
    parser = argparse.ArgumentParser(prog=f"python -m {program}", description=description)
    parser.add_argument("--config", help="YAML file; omit for the defaults")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied after the file")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("megarl").setLevel(logging.INFO if is_first_rank() else logging.WARNING)
    return args


def is_first_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The processes of this launch (torchrun's ``WORLD_SIZE``; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def report(program: str, lines: list[str], exit_code: int) -> int:
    """Print ``program: line`` for each line (first rank only), record the message as this worker's
    error for torchrun (every rank), and return ``exit_code``."""
    message = "\n".join(f"{program}: {line}" for line in lines)
    if is_first_rank():
        print(message, file=sys.stderr, flush=True)
    # Every rank that reports records it: torchrun's root cause is whichever rank it saw fail first.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torch elastic's format; its root-cause block shows "py_callstack": here, the message.
        extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
        with open(error_file, "w") as handle:
            json.dump({"message": {"message": message, "extraInfo": extra}}, handle)
    return exit_code


def refuse(program: str, *problems: Exception | str) -> int:
    """Report bad input for ``program``, a line per problem (first rank only), and return the exit
    code to end with."""
    return report(program, [str(problem) for problem in problems], BAD_INPUT_EXIT_CODE)


def positive(text: str) -> int:
    """``argparse`` type of the conversion tools' layout sizes: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


class LayoutRefused(Exception):
    """A conversion tool's layout that does not fit the model or the number of processes.

    Attributes:
        problems: one message per problem, as :func:`megarl.config.layout_errors` writes them.
    """

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def check_layout(layout: ParallelConfig, hf_dir: str | Path) -> None:
    """Raise :class:`LayoutRefused` unless ``layout`` runs the model of the HF directory ``hf_dir``
    on this launch's processes; the problems name the tools' flags (:data:`LAYOUT_FLAGS`)."""
    problems = layout_errors(layout, world_size(), ModelFacts.from_hf_dir(hf_dir), LAYOUT_FLAGS)
    if problems:
        raise LayoutRefused(problems)


def run_conversion(program: str, convert: Callable[[], Path], bad_input: tuple[type[Exception], ...]) -> int:
    """Run a conversion tool's ``convert`` (its checks, then the conversion) and return the exit code.

    Library warnings that are noise are silenced first. Success: the first rank prints
    ``wrote <the path convert returns>``; 0. Bad input, refused with
    :data:`BAD_INPUT_EXIT_CODE`: a :class:`LayoutRefused` (a line per problem) or an exception of
    ``bad_input`` (its message); anything else propagates.
    """
    quiet_library_warnings()
    try:
        out = convert()
    except LayoutRefused as refused:
        return refuse(program, *refused.problems)
    except bad_input as error:
        return refuse(program, error)
    if is_first_rank():
        print(f"wrote {out}")
    return 0
