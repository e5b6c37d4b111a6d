"""The manager's collectives: how training threads of different ranks agree with each other.

One gloo group over the manager's ranks, used only on the training thread, in the same order on
every rank: at construction (this run's id, where each rank sits in each named group), in
``save()`` (skip decisions, replication validation) and in ``load()`` (which checkpoint, and
whether it read everywhere). Background threads never come here (invariant 5); they talk
through the c10d Store (``store_channel.CommitChannel``). In a single process every call is local.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from .topology import group_places


def coordination_group(process_group: Any, timeout_s: float) -> Any:
    """A gloo group over the manager's ranks: ``process_group`` itself if it is gloo, else a new one.

    Collective over those ranks (``new_group``); training thread, at construction.
    """
    group = process_group or dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        return group
    return dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class Coordinator:
    """Object collectives on the coordination group (``group=None``: one process, all local).

    Every method is a collective: training thread, every rank, same order; blocks until every
    rank of the group has called it (gloo's timeout bounds it).
    """

    def __init__(self, group: Any, world_ranks: list[int]) -> None:
        self.group = group
        self.world_ranks = world_ranks  # global ranks of the manager's ranks, in group order

    def broadcast(self, obj: Any) -> Any:
        """The first rank's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.world_ranks[0], group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return any(self.gather(bool(flag)))

    def places(self, groups: Mapping[str, Any], rank: int) -> dict:
        """Where ``rank`` sits in each named process group (``topology.group_places``)."""
        mine = {name: tuple(self.world_ranks.index(m) for m in dist.get_process_group_ranks(group)) for name, group in groups.items()}
        gathered = self.gather(mine)
        return group_places({name: [g[name] for g in gathered] for name in groups}, rank)
