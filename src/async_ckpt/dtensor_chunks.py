"""The DTensor side of SHARDED saves: which local shards this rank writes, and their boxes.

Training thread only (inside ``save()`` and at load): it reads DTensor metadata (mesh
coordinate, placements, local box via the helper DCP uses) and never communicates. Background
threads never import it (they get plain staged tensors and ``chunk_meta`` records).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointConfigError
from .sharding import Box, Path_, fqn, owns_chunk, skeleton, walk


def is_dtensor(value: Any) -> bool:
    from .mesh import _is_dtensor

    return _is_dtensor(value)


def local_box(tensor: torch.Tensor) -> Box:
    """The box of the global tensor this rank's local shard holds (the whole tensor if plain)."""
    if not is_dtensor(tensor):
        return Box((0,) * tensor.dim(), tuple(tensor.shape))
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return Box(tuple(int(o) for o in offset), tuple(int(s) for s in shape))


@dataclass(frozen=True)
class OwnedChunk:
    """One chunk this rank writes: where it lives in the state and in the global tensor."""

    path: Path_
    name: str  # the key in this rank's file (the tensor's dotted name)
    global_shape: tuple[int, ...]
    box: Box
    local: torch.Tensor  # the local tensor (a view of the live state; staged before writing)


def plan_chunks(state: Any, rank: int) -> tuple[list[OwnedChunk], list[tuple[Path_, Any]]]:
    """Split a live SHARDED state into the chunks this rank writes and the plain values.

    Training thread, inside ``save()``. Returns ``(chunks, values)``: ``values`` are the
    non-tensor leaves, kept by rank 0 only (every rank holds the same). No communication.
    """
    chunks, values = [], []
    for path, leaf in walk(state):
        if isinstance(leaf, torch.Tensor):
            if is_dtensor(leaf):
                coordinate = leaf.device_mesh.get_coordinate()
                if (
                    coordinate is None
                    or not owns_chunk(leaf.placements, coordinate)
                    or _implicit_replica(leaf.device_mesh)
                ):
                    continue
                local = leaf.to_local()
            elif rank == 0:
                local = leaf
            else:
                continue
            box = local_box(leaf)
            if box.numel == 0 and leaf.dim() > 0:
                continue  # an empty shard of an uneven split: nothing to write
            chunks.append(OwnedChunk(path, fqn(path), tuple(int(n) for n in leaf.shape), box, local.detach()))
        elif rank == 0:
            values.append((path, leaf))
    names = [c.name for c in chunks]
    if len(set(names)) != len(names):
        raise CheckpointConfigError("two tensors of a SHARDED state have the same dotted name; rename the keys")
    return chunks, values


def chunk_meta(chunks: Sequence[Any]) -> list[dict[str, Any]]:
    """The manifest fields known before writing (training thread, from ``sharding.plan_chunks``)."""
    return [
        {
            "path": list(c.path),
            "fqn": c.name,
            "shape": list(c.global_shape),
            "offsets": list(c.box.offsets),
            "lengths": list(c.box.lengths),
        }
        for c in chunks
    ]


def staged_state(chunks: Sequence[Any], values: Sequence[tuple], state: Any, safetensors: bool, rank: int) -> Any:
    """What the staging pool copies: the chunk tensors (and rank 0's skeleton for torch files)."""
    tensors = {c.name: c.local for c in chunks}
    if safetensors:
        if values:
            path, value = values[0]
            raise CheckpointConfigError(
                f"entry {'.'.join(map(str, path))!r} is a {type(value).__name__}, not a tensor: "
                "a safetensors SHARDED component holds tensors only; use file_format='torch'"
            )
        return tensors
    return {"chunks": tensors, "skeleton": skeleton(state) if rank == 0 else None}


def shard_state(state: Any, rank: int, *, safetensors: bool) -> tuple[Any, list[dict[str, Any]]]:
    """This rank's share of a live SHARDED state, to stage, and its chunk records so far.

    Training thread, inside ``save()``: local shards only (``to_local``), no gather and no
    collective; the staging pool then copies them like any other tensors.
    """
    chunks, values = plan_chunks(state, rank)
    return staged_state(chunks, values, state, safetensors, rank), chunk_meta(chunks)


def _implicit_replica(mesh: Any) -> bool:
    """Whether this rank holds a copy of its shard that a lower coordinate writes.

    A DTensor on a sub-mesh (FSDP on ``mesh["dp"]`` of a (dp, tp) mesh) is replicated over the
    root mesh's other dimensions without saying so; the writer is coordinate 0 along them. A
    sub-mesh whose names are not the root's (a flattened dimension) cannot be told apart: every
    copy is written and the loader keeps the first of identical chunks.
    """
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    names, mine = getattr(root, "mesh_dim_names", None), getattr(mesh, "mesh_dim_names", None)
    if root is mesh or not names or not mine or not set(mine) <= set(names):
        return False
    coordinate = root.get_coordinate()
    return coordinate is not None and any(coordinate[i] != 0 for i, name in enumerate(names) if name not in mine)
