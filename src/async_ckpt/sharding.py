"""Chunk planning for SHARDED components: who writes which chunk, and what overlaps what (pure).

A SHARDED component's state holds DTensors (an FSDP2 or tensor parallel module, its optimizer
keyed by parameter names) next to plain tensors and values. Every tensor is saved as *chunks*:
boxes of the global tensor given by ``offsets`` and ``lengths`` per dimension. A DTensor's
chunk is a rank's local shard; a shard replicated over a mesh dimension is written once, by
the rank whose coordinate along every ``Replicate`` dimension is 0 (``owns_chunk``), so the
bytes on disk equal the global state once at any world size. A plain tensor is one chunk
covering it, written by rank 0.

On load each rank intersects the boxes it now holds with the saved ones (``overlap``) and copies
only the overlapping regions (``copy_region``). Nothing here does I/O, imports
torch.distributed or talks to other ranks: the DTensor side is ``dtensor_chunks``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointConfigError

Path_ = tuple  # a key path into a state tree: ("state", "layers.0.weight", "exp_avg")


@dataclass(frozen=True)
class Box:
    """A region of a global tensor: ``offsets[d]`` to ``offsets[d] + lengths[d]`` on each dim."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for length in self.lengths:
            n *= length
        return n


def fqn(path: Sequence[Any]) -> str:
    """The dotted name of a key path: ``("state", "0.weight", "exp_avg")`` -> ``state.0.weight.exp_avg``."""
    return ".".join(str(p) for p in path)


def overlap(saved: Box, wanted: Box) -> Box | None:
    """The intersection of two boxes of the same tensor, or None when they do not meet."""
    if len(saved.offsets) != len(wanted.offsets):
        return None
    offsets, lengths = [], []
    for so, sl, wo, wl in zip(saved.offsets, saved.lengths, wanted.offsets, wanted.lengths):
        start, end = max(so, wo), min(so + sl, wo + wl)
        if end <= start:
            return None
        offsets.append(start)
        lengths.append(end - start)
    return Box(tuple(offsets), tuple(lengths))


def region_slices(region: Box, within: Box) -> tuple[slice, ...]:
    """Slices selecting ``region`` inside a tensor that holds the box ``within``."""
    return tuple(slice(o - w, o - w + n) for o, n, w in zip(region.offsets, region.lengths, within.offsets))


def copy_region(dst: torch.Tensor, dst_box: Box, src: torch.Tensor, src_box: Box) -> int:
    """Copy the overlap of ``src`` (holding ``src_box``) into ``dst`` (holding ``dst_box``).

    Returns the number of elements copied (0 when the boxes do not meet). A 0-dim tensor is one
    box with no dimensions; it overlaps itself.
    """
    if dst.dim() == 0:
        dst.copy_(src.reshape(()))
        return 1
    region = overlap(src_box, dst_box)
    if region is None:
        return 0
    dst[region_slices(region, dst_box)].copy_(src[region_slices(region, src_box)])
    return region.numel


def covered(boxes: Sequence[Box], target: Box) -> int:
    """Elements of ``target`` covered by ``boxes`` (saved chunks never overlap each other)."""
    if not target.lengths:
        return 1 if boxes else 0
    return sum(r.numel for r in (overlap(b, target) for b in boxes) if r is not None)


def owns_chunk(placements: Sequence[Any], coordinate: Sequence[int]) -> bool:
    """Whether the rank at ``coordinate`` writes its local shard: coordinate 0 on every Replicate dim.

    ``placements`` are DTensor placements (``Shard``, ``Replicate``); a ``Partial`` placement is
    a pending reduction, not state, and is refused.
    """
    for placement, coord in zip(placements, coordinate):
        if placement.is_partial():
            raise CheckpointConfigError(
                f"a DTensor with a Partial placement ({placement}) cannot be checkpointed: reduce it first "
                "(e.g. dtensor.redistribute(placements=[Replicate()]))"
            )
        if placement.is_replicate() and coord != 0:
            return False
    return True


def walk(state: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every leaf of a state tree (dicts, lists, tuples) with its key path; tensors are leaves."""
    if isinstance(state, Mapping):
        for key, value in state.items():
            yield from walk(value, path + (key,))
    elif isinstance(state, (list, tuple)) and not hasattr(state, "_fields"):
        for index, value in enumerate(state):
            yield from walk(value, path + (index,))
    else:
        yield path, state


def skeleton(state: Any) -> Any:
    """The state tree with every tensor replaced by None (what rank 0 saves of its structure)."""
    if isinstance(state, torch.Tensor):
        return None
    if isinstance(state, Mapping):
        return {k: skeleton(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)) and not hasattr(state, "_fields"):
        items = [skeleton(v) for v in state]
        return items if isinstance(state, list) else tuple(items)
    return state


def put(tree: Any, path: Path_, value: Any) -> Any:
    """``tree`` with the leaf at ``path`` replaced by ``value`` (tuples are rebuilt, the rest set)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if not rest and isinstance(tree, dict):
        tree[head] = value
        return tree
    if isinstance(tree, tuple):
        items = list(tree)
        items[head] = put(items[head], rest, value)
        return tuple(items)
    tree[head] = put(tree[head], rest, value)
    return tree


def get(tree: Any, path: Path_) -> Any:
    """The value at ``path`` in ``tree``, or None when the path does not exist."""
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree
