"""The broadcast group that carries weights from the trainer to disaggregated engines.

The trainer process that runs the client is rank 0; engine ``k``'s tensor-parallel ranks are
``rank_offset_k + tp_rank``. Both sides must build the group the same way for their stores and
communicators to meet: a TCP rendezvous at ``master_address:master_port`` (rank 0 hosts the
store), a ``PrefixStore`` named after the group, then torch's process-group constructor, which is
how SGLang's ``init_custom_process_group`` (``sglang.srt.utils``) builds its side. The group is
independent of the trainer's default process group (it spans processes outside it), which is why
this goes through torch's private ``_new_process_group_helper``, as SGLang does. Rank 0 hosts the
store itself (a ``TCPStore`` server), which is what SGLang's ranks connect to.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def join_update_group(master_address: str, master_port: int, rank: int, world_size: int, backend: str, group_name: str, timeout_s: float):
    """Join (rank 0: create) a weight-update group; blocks until every rank has joined.

    Args:
        master_address: host of rank 0.
        master_port: port of rank 0's rendezvous store.
        rank: this process's rank in the group.
        world_size: ranks in the group.
        backend: ``nccl`` or ``gloo``.
        group_name: the same on every rank.
        timeout_s: limit of the rendezvous and of every collective in the group.

    Returns:
        The process group; broadcast with ``dist.broadcast(tensor, group_src=0, group=group)``.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    # The store is made directly, not through dist.rendezvous: under torchrun that would connect to
    # torchrun's own store instead of hosting this group's (TORCHELASTIC_USE_AGENT_STORE).
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], dist.Backend(backend), dist.PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[group] = {index: index for index in range(world_size)}
    return group


def leave_update_group(group) -> None:
    """Destroy a group made by :func:`join_update_group` (this process's side of it)."""
    dist.destroy_process_group(group)
