"""Which node (machine) of the launch this process runs on, and who leads each node.

``torchrun --nnodes N --nproc_per_node P`` starts P processes on each of N nodes; each node's first
(local rank 0) launches and supervises that node's rollout engines, and the weight stream
assembles a copy of the model on every node's first for its engines. Node facts come from
torchrun's environment, so they are known before torch.distributed starts (the engines launch
that early, :mod:`megarl.trainer.launch`); a plain process is the one rank of one node.
"""

from __future__ import annotations

import dataclasses
import os
import socket


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """The machine this process runs on (:meth:`from_env`)."""

    index: int
    """This node's index (``torchrun --nnodes``: the order the rendezvous gave, not ``--node-rank``)."""
    count: int
    """Nodes in the launch."""
    leads: bool
    """This process is its node's first (local rank 0): it launches and supervises the node's engines."""
    ranks: int = 1
    """Ranks on this node (``torchrun --nproc_per_node``), one GPU each on CUDA machines."""

    @classmethod
    def from_env(cls) -> Node:
        """This process's node, from torchrun's environment."""
        return cls(
            index=int(os.environ.get("GROUP_RANK", "0")), count=int(os.environ.get("GROUP_WORLD_SIZE", "1")),
            leads=os.environ.get("LOCAL_RANK", "0") == "0", ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )

    def engine_host(self) -> tuple[str, str | None]:
        """``(interface, address)`` the node's engines listen on and are called at: the loopback
        on one node; on several, every interface and the address this node reaches the rendezvous
        host (``MASTER_ADDR``) from, the one the other nodes reach it at."""
        if self.count == 1:
            return "127.0.0.1", None
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            probed = probe.getsockname()[0]
        own = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
        return "0.0.0.0", routable_address(probed, master, own)


def routable_address(probed: str, master: str, own: list[str]) -> str:
    """The address other nodes call this node's engines at: ``probed`` (this node's side of a route
    to ``master``), unless that is a loopback address while ``master`` is not (the rendezvous host's
    name maps to 127.0.1.1 in its own /etc/hosts): then the first of this host's ``own`` addresses
    that is not a loopback one.

    Raises:
        RuntimeError: this host has no other address to give.
    """
    if not probed.startswith("127.") or master == "localhost" or master.startswith("127."):
        return probed
    for address in own:
        if not address.startswith("127."):
            return address
    raise RuntimeError(
        f"this node reaches the rendezvous host {master} over the loopback ({probed}) and has no other address for the other nodes "
        "to call its engines at: give torchrun an --rdzv-endpoint address that other nodes reach this one by"
    )


def node_ranks() -> list[list[int]]:
    """The global ranks of every node, in node order, each led by its local rank 0 (collective)."""
    import torch.distributed as dist

    node = Node.from_env()
    places: list[tuple[int, int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(places, (node.index, int(os.environ.get("LOCAL_RANK", "0"))))
    ranks: list[list[int]] = [[] for _ in range(max(index for index, _ in places) + 1)]
    for rank, (index, _) in sorted(enumerate(places), key=lambda item: item[1]):
        ranks[index].append(rank)
    return ranks
