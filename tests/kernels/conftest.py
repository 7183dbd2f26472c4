"""Kernel tests run the Triton kernels under Triton's interpreter on machines without CUDA.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the switch has
to be on before ``megarl.kernels`` is first imported. On a machine with CUDA the same tests run
the kernels compiled, on CUDA tensors.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton's own library functions (tl.cdiv ...) are decorated when triton.language is imported:
    # Megatron imports it, so a test module collected before this one that imports Megatron at its
    # top breaks every kernel test as surely as an early megarl.kernels does.
    imported = sorted(name for name in sys.modules if name.startswith("megarl.kernels.") or name == "triton.language")
    if imported:
        raise RuntimeError(
            f"{imported} were imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "their kernels are compiled-only and cannot run on this CPU machine: import megarl.kernels, "
            "and whatever imports Megatron or Triton, lazily (inside the test functions) in the test "
            "modules collected before tests/kernels"
        )
    os.environ["TRITON_INTERPRET"] = "1"
