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
    """The machine this process runs on, among the launch's nodes (torchrun's environment: ``GROUP_RANK``,
    ``GROUP_WORLD_SIZE``, ``LOCAL_RANK``; a plain process is the one rank of one node). Known before
    torch.distributed starts: the engines launch that early (:mod:`megarl.trainer.launch`)."""

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
        on one node; on several, every interface and the address this node reaches the launch's
        first node at (``MASTER_ADDR``) from."""
        if self.count == 1:
            return "127.0.0.1", None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))))
            return "0.0.0.0", probe.getsockname()[0]


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
