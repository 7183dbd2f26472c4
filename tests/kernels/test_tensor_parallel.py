"""Both ops over a two-rank tensor-parallel group of real gloo processes (see the worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_torchrun

pytestmark = pytest.mark.multirank

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


def test_both_ops_over_two_ranks():
    result = run_torchrun(WORKER, [], nproc=2)
    for rank in range(2):
        assert f"rank {rank}/2: 10 cases ok" in result.stdout, result.stdout
