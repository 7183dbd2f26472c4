"""The Triton kernels compile for an H100 on any machine, on the tensor cores and pipelined.

The interpreter runs the kernels' logic on the CPU but never lowers them for a GPU; this compiles
them for sm_90 in a fresh process (see ``compile_for_h100.py``): the first configuration of each
variant (TMA descriptors, persistent programs). ``python tests/kernels/compile_for_h100.py
--all-configs`` adds ``ptxas -v``'s register and spill counts of every configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_python

pytestmark = pytest.mark.cpu

WORKER = Path(__file__).with_name("compile_for_h100.py")
H100_SHARED_MEMORY = 227 * 1024  # the most shared memory one block may use on sm_90


def test_kernels_compile_for_h100():
    # Without ptxas -v (seconds per kernel): its register and spill counts are a report, not a check.
    compiled = [json.loads(line) for line in run_python(WORKER, ["--no-registers"]).stdout.splitlines()]
    assert {(entry["module"].rsplit(".", 1)[1], entry["kernel"]) for entry in compiled} == {
        ("logprob_entropy", "_stats_kernel"),
        ("logprob_entropy", "_backward_kernel"),
        ("fused_linear_logprob_entropy_triton", "_stats_kernel"),
        ("fused_linear_logprob_entropy_triton", "_grad_logits_kernel"),
        ("matmul_accumulate", "_matmul_accumulate_kernel"),
    }
    # The first configuration of every variant: pointer-based, TMA, persistent, both.
    variants = {
        (entry["kernel"], entry["config"].get("USE_TMA"), entry["config"].get("PERSISTENT")) for entry in compiled
        if entry["kernel"] == "_grad_logits_kernel"
    }
    assert variants == {("_grad_logits_kernel", tma, persistent) for tma in (False, True) for persistent in (False, True)}
    for entry in compiled:
        assert entry["shared_bytes"] <= H100_SHARED_MEMORY, entry
        if entry["module"].rsplit(".", 1)[1] != "logprob_entropy":
            # Hopper tensor-core MMAs fed by asynchronous, multi-stage loads: cp.async or TMA.
            assert entry["wgmma"] > 0, entry
            if entry["config"].get("USE_TMA"):
                assert entry["tma"] > 0 and entry["cp_async"] == 0, entry
            else:
                assert entry["cp_async"] > 0 and entry["tma"] == 0, entry
