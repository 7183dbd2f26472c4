"""What the first rank starts before the heavy imports (megarl.trainer.launch)."""

from __future__ import annotations

import textwrap

import pytest

from tests.distributed import run_python_source

pytestmark = pytest.mark.cpu


def test_the_early_start_imports_nothing_heavy_before_it_launches_the_engines():
    # train.py builds EarlyStart before it imports the trainer, so that the engines come up while
    # the ranks import Megatron: importing its module must not import what the trainer imports
    # later (docs/benchmarks.md, "Main job": the first step's time is mostly imports).
    script = textwrap.dedent(
        """
        import sys
        import megarl.trainer.launch
        heavy = [name for name in ("megatron", "transformers", "fastapi", "uvicorn") if name in sys.modules]
        assert not heavy, heavy
        """
    )
    run_python_source(script)
