"""The Triton kernels compile for an H100 on any machine, on the tensor cores and pipelined.

The interpreter runs the kernels' logic on the CPU but never lowers them for a GPU; this compiles
them for sm_90 in a fresh process (see ``compile_for_h100.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_python

pytestmark = pytest.mark.cpu

WORKER = Path(__file__).with_name("compile_for_h100.py")
H100_SHARED_MEMORY = 227 * 1024  # the most shared memory one block may use on sm_90
MATMUL_KERNELS = {"_stats_kernel", "_grad_logits_kernel", "_matmul_accumulate_kernel"}


def test_kernels_compile_for_h100():
    compiled = [json.loads(line) for line in run_python(WORKER, []).stdout.splitlines()]
    assert {(entry["module"].rsplit(".", 1)[1], entry["kernel"]) for entry in compiled} == {
        ("logprob_entropy", "_stats_kernel"),
        ("logprob_entropy", "_backward_kernel"),
        *(("fused_linear_logprob_entropy_triton", kernel) for kernel in MATMUL_KERNELS),
    }
    for entry in compiled:
        assert entry["shared_bytes"] <= H100_SHARED_MEMORY, entry
        if entry["module"].endswith("fused_linear_logprob_entropy_triton"):
            # Hopper tensor-core MMAs fed by asynchronous, multi-stage loads.
            assert entry["wgmma"] > 0 and entry["cp_async"] > 0, entry
