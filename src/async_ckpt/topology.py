"""Where this process sits: rank, world size, node, and its instance of each named group.

A ``Topology`` is a frozen value built once at manager construction (``Topology.detect``) and
passed around; it does no I/O and no communication after it is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from .errors import CheckpointConfigError


@dataclass(frozen=True)
class GroupPlace:
    """This rank's place in one named process group."""

    index: int  # which instance of the group (0..count-1, ordered by the lowest member rank)
    rank: int  # this process's rank inside its instance
    ranks: tuple[int, ...]  # members of this instance, as ranks of the checkpoint's group


@dataclass(frozen=True)
class Topology:
    """Rank layout of one checkpointing job (ranks are ranks of the manager's process group)."""

    rank: int = 0  # this process's rank
    world_size: int = 1  # processes that take part in every save
    local_rank: int = 0  # rank on this node (LOCAL_RANK)
    node: int = 0  # node index (GROUP_RANK, else RANK // LOCAL_WORLD_SIZE)
    groups: Mapping[str, GroupPlace] = field(default_factory=dict)  # name -> place

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @staticmethod
    def detect(process_group: Any = None, groups: Mapping[str, GroupPlace] | None = None) -> "Topology":
        """Read rank and node from torch.distributed and the launcher's environment.

        Called on the training thread at manager construction. Without an initialised process
        group this is a single process: rank 0 of 1.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return Topology(groups=dict(groups or {}))
        rank = dist.get_rank(process_group)
        world = dist.get_world_size(process_group)
        local_rank, node = node_from_env(os.environ, rank)
        return Topology(rank=rank, world_size=world, local_rank=local_rank, node=node, groups=dict(groups or {}))

    def place(self, group: str) -> GroupPlace:
        try:
            return self.groups[group]
        except KeyError:
            raise CheckpointConfigError(f"[rank {self.rank}] unknown process group '{group}'") from None


def node_from_env(env: Mapping[str, str], rank: int) -> tuple[int, int]:
    """Return ``(local_rank, node)`` from torchrun/SLURM-style variables.

    ``LOCAL_RANK`` and ``GROUP_RANK`` (torchrun's node rank) are used when set; otherwise the
    node is ``RANK // LOCAL_WORLD_SIZE``; with none of them the job is taken to be one node.
    """
    local_rank = _int(env, "LOCAL_RANK", rank)
    if "GROUP_RANK" in env:
        return local_rank, _int(env, "GROUP_RANK", 0)
    if "LOCAL_WORLD_SIZE" in env:
        return local_rank, rank // max(1, _int(env, "LOCAL_WORLD_SIZE", 1))
    return local_rank, 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise CheckpointConfigError(f"Environment variable {name}={raw!r} is not an integer.") from None


def group_places(leaders_by_rank: Mapping[str, list[tuple[int, ...]]], rank: int) -> dict[str, GroupPlace]:
    """Number the instances of each named group from every rank's member list (pure).

    ``leaders_by_rank[name][r]`` is the member tuple of rank ``r``'s instance of group ``name``
    (gathered from every rank by the manager). Instances are numbered in order of their lowest
    member, so every rank computes the same index for the same instance.
    """
    places = {}
    for name, members_per_rank in leaders_by_rank.items():
        instances = sorted(set(members_per_rank), key=min)
        mine = members_per_rank[rank]
        places[name] = GroupPlace(index=instances.index(mine), rank=mine.index(rank), ranks=mine)
    return places
