"""What megarl's command-line programs share: how they report bad input.

Bad input (a config, a model directory, a checkpoint, a layout that does not fit) ends the program
with one line that names the file or option and says what to do, exit code 2, no traceback. Under
``torchrun`` the first rank prints the line (every rank exits), and it also goes to torch elastic's
error file, so that torchrun's "Root Cause" block shows it instead of "To enable traceback see".
torchrun itself then exits with 1, whatever its workers' codes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from megarl.config import LayoutSpelling

BAD_INPUT_EXIT_CODE = 2

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


def is_first_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The processes of this launch (torchrun's ``WORLD_SIZE``; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse(program: str, *problems: Exception | str) -> int:
    """Report bad input for ``program``, a line per problem (first rank only), and return the exit
    code to end with."""
    message = "\n".join(f"{program}: {problem}" for problem in problems)
    if is_first_rank():
        print(message, file=sys.stderr)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with open(error_file, "w") as handle:
                json.dump({"message": message, "timestamp": str(int(time.time()))}, handle)
    return BAD_INPUT_EXIT_CODE
