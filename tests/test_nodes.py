"""megarl/nodes.py: a rank's node from torchrun's environment, and where its engines listen."""

from __future__ import annotations

import pytest

from megarl.nodes import Node

pytestmark = pytest.mark.cpu


def test_a_plain_process_is_the_one_rank_of_one_node(monkeypatch):
    for name in ("GROUP_RANK", "GROUP_WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    node = Node.from_env()
    assert node == Node(index=0, count=1, leads=True)
    assert node.engine_host() == ("127.0.0.1", None)


@pytest.mark.parametrize(("local_rank", "leads"), [("0", True), ("3", False)])
def test_torchrun_names_the_node_and_its_first_rank(monkeypatch, local_rank, leads):
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert Node.from_env() == Node(index=1, count=4, leads=leads, ranks=8)


def test_engines_of_several_nodes_listen_everywhere_at_the_address_that_reaches_the_first_node(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert Node(index=1, count=2, leads=True).engine_host() == ("0.0.0.0", "127.0.0.1")
