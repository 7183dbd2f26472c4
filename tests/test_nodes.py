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


@pytest.mark.parametrize(
    ("probed", "master", "own", "expected"),
    [
        ("10.0.0.7", "head", ["127.0.1.1", "10.0.0.7"], "10.0.0.7"),
        # The rendezvous host itself, whose name its /etc/hosts maps to 127.0.1.1.
        ("127.0.1.1", "head", ["127.0.1.1", "10.0.0.1"], "10.0.0.1"),
        # Every "node" on this machine (the tests): the loopback is right.
        ("127.0.0.1", "127.0.0.1", ["127.0.1.1"], "127.0.0.1"),
    ],
)
def test_engines_are_called_at_an_address_other_nodes_reach(probed, master, own, expected):
    from megarl.nodes import routable_address

    assert routable_address(probed, master, own) == expected


def test_a_node_with_only_a_loopback_address_is_refused():
    from megarl.nodes import routable_address

    with pytest.raises(RuntimeError, match="over the loopback .* give torchrun an --rdzv-endpoint address"):
        routable_address("127.0.1.1", "head", ["127.0.1.1"])
