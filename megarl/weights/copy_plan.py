"""Copy plans and the C++ engine that executes them (``torch.ops.megarl.execute_copy_plan``).

A copy plan is an int64 CPU tensor ``[num_copies, PLAN_COLUMNS]``; row ``i`` copies a 2-D block of
``ROWS`` rows of ``ROW_LENGTH`` elements from ``sources[SOURCE]`` into a flat byte buffer,
converting each element from ``SOURCE_DTYPE`` to ``OUT_DTYPE`` (float32, bfloat16, float16;
rounding to nearest even, as ``Tensor.to`` does)::

    out[OUT_OFFSET + r * OUT_ROW_STRIDE + e * size(OUT_DTYPE)] =
        sources[SOURCE][SOURCE_OFFSET + r * SOURCE_ROW_STRIDE + e * size(SOURCE_DTYPE)]

Offsets and strides are in bytes, so a source may be a raw ``uint8`` buffer holding several dtypes.
The engine knows nothing about models: :mod:`megarl.weights.planner` writes the plans. The columns
and dtype codes mirror ``csrc/copy_plan.h``.
"""

from __future__ import annotations

from typing import Sequence

import torch

import megarl._C  # noqa: F401  (registers torch.ops.megarl)

(
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_ROW_STRIDE,
    OUT_OFFSET,
    OUT_ROW_STRIDE,
    ROWS,
    ROW_LENGTH,
    SOURCE_DTYPE,
    OUT_DTYPE,
) = range(9)
PLAN_COLUMNS = 9

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    """The plan's code for ``dtype``; a ``ValueError`` for dtypes the engine does not convert."""
    if dtype not in DTYPE_CODES:
        raise ValueError(
            f"the weight stream copies float32, bfloat16 and float16 tensors, not {dtype}; "
            f"cast the model or choose one of those as the stream's dtype"
        )
    return DTYPE_CODES[dtype]


def empty_plan() -> torch.Tensor:
    """A plan with no copies: ``[0, PLAN_COLUMNS]``."""
    return torch.empty(0, PLAN_COLUMNS, dtype=torch.int64)


def execute_copy_plan(plan: torch.Tensor, sources: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """Run every copy of ``plan`` into ``out``, in place, in one call into C++.

    On the CPU the copies are spread over ``torch.get_num_threads()`` threads; on a GPU they run as
    one batched kernel on the current stream. The GIL is released while it runs.

    Args:
        plan: int64 ``[num_copies, PLAN_COLUMNS]`` on the CPU, whatever device the data is on.
        sources: contiguous tensors that the ``SOURCE`` column indexes, on ``out``'s device; each is
            either a ``uint8`` buffer or of the dtype its rows name.
        out: flat ``uint8`` ``[nbytes]``.

    Raises:
        RuntimeError: a row reaches past its source or ``out``, names a missing source, or reads a
            typed source as another dtype (the message names the row).
    """
    torch.ops.megarl.execute_copy_plan(plan, list(sources), out)
