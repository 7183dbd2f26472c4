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


def test_engines_are_told_their_dtype_and_to_return_routed_experts_with_r3():
    from megarl.config import load_config
    from megarl.trainer.launch import engine_settings

    assert engine_settings(load_config(None, [])) == {"dtype": "float32", "return_routed_experts": False}
    assert engine_settings(load_config(None, ["model.dtype=bf16"]))["dtype"] == "bfloat16"
    settings = engine_settings(load_config(None, ["model.dtype=fp32", "rollout.dtype=bf16", "algorithm.routing_replay=r3"]))
    assert settings == {"dtype": "bfloat16", "return_routed_experts": True}


@pytest.mark.parametrize(
    ("overrides", "node", "expected"),
    [
        ([], dict(index=0, count=1, leads=True, ranks=8), {}),
        # Not colocated: the engines take the node's GPUs after its 4 ranks'.
        (["rollout.colocate=false", "rollout.mode=async"], dict(index=0, count=1, leads=True, ranks=4), {"first_gpu": 4}),
        # Several nodes: named for their node, listening everywhere, called at the node's address.
        ([], dict(index=2, count=4, leads=True, ranks=8), {"node": 2, "host": "0.0.0.0", "address": "127.0.0.1", "num_nodes": 4}),
        # Engines given by URL are the first rank's, wherever they run.
        (["rollout.engine_urls=[http://10.0.0.1:30000]"], dict(index=0, count=4, leads=True, ranks=8), {}),
    ],
)
def test_where_a_nodes_engines_run(monkeypatch, overrides, node, expected):
    from megarl.config import load_config
    from megarl.nodes import Node
    from megarl.trainer.launch import node_settings

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert node_settings(load_config(None, overrides), Node(**node)) == expected
