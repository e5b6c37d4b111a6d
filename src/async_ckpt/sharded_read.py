"""Loading SHARDED components: read the saved chunks that overlap this rank's live shards.

Training thread, at load, before anything is applied (all or nothing): every rank preads only
the chunks its live shards overlap (in parallel), verifies each chunk's xxh3 from the manifest,
and builds its new local shards; DTensors are rebuilt with ``from_local`` and the live placements.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .dtensor_chunks import is_dtensor, local_box
from .errors import CheckpointCorruptError, CheckpointLoadError
from .sharding import Box, copy_region, covered, get, put
from .sharded_io import read_chunk, read_skeleton
from .storage import safe_member

READ_THREADS = 4  # chunks read at once by one rank


def read_sharded(
    directory: Path, manifest: Any, key: str, target: Callable[[tuple, tuple], Any], *, verify: bool
) -> Any:
    """Read the saved chunks that overlap this rank's live shards of component ``key``.

    Training thread, at load, before anything is applied. ``target(path, global shape)`` is the
    live tensor a saved one becomes (or None): a DTensor target makes it a DTensor placed like
    it (``from_local``, no communication); any other saved tensor is read in full. Raises
    ``CheckpointCorruptError`` for damaged bytes,
    ``CheckpointLoadError`` when a live tensor's global shape differs from the saved one.
    """
    files = manifest.files_of(key)
    by_name: dict[str, list[tuple[Path, dict]]] = {}
    structure: Any = None
    for name, entry in sorted(files.items()):
        path = safe_member(directory, name)
        if not path.exists():
            raise CheckpointCorruptError(f"component '{key}': file {name} is listed in the manifest but missing")
        if path.stat().st_size != entry.size:
            raise CheckpointCorruptError(f"Size mismatch for {path}: manifest says {entry.size} bytes")
        for record in entry.chunks or []:
            known = by_name.setdefault(record["fqn"], [])
            if not any(r["offsets"] == record["offsets"] and r["lengths"] == record["lengths"] for _, r in known):
                known.append((path, record))  # identical copies (written by every replica): the first one
        if entry.pickle:
            structure = read_skeleton(path, entry.pickle, verify)
    plans = []
    for name, chunks in by_name.items():
        first = chunks[0][1]
        tpath, shape = tuple(first["path"]), tuple(first["shape"])
        live = target(tpath, shape)
        if isinstance(live, torch.Tensor) and tuple(live.shape) != shape:
            raise CheckpointLoadError(
                f"tensor {name} of component '{key}' has global shape {shape} in the checkpoint "
                f"but {tuple(live.shape)} here"
            )
        box = local_box(live) if is_dtensor(live) else Box((0,) * len(shape), shape)
        wanted = [(p, r) for p, r in chunks if covered([Box(tuple(r["offsets"]), tuple(r["lengths"]))], box)]
        if (
            covered([Box(tuple(r["offsets"]), tuple(r["lengths"])) for _, r in wanted], box) != max(1, box.numel)
            and box.numel
        ):
            raise CheckpointCorruptError(
                f"the saved chunks of tensor {name} (component '{key}') do not cover the region {box} this rank needs"
            )
        plans.append((tpath, live, box, getattr(torch, first["dtype"]), wanted))
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="async_ckpt-read") as pool:
        reads = {id(r): pool.submit(read_chunk, p, r, verify) for _, _, _, _, wanted in plans for p, r in wanted}
        state: Any = {} if structure is None else structure
        for tpath, live, box, dtype, wanted in plans:
            exact = (
                len(wanted) == 1
                and wanted[0][1]["offsets"] == list(box.offsets)
                and wanted[0][1]["lengths"] == list(box.lengths)
            )
            if exact:  # the same layout as the save: the chunk is the new local shard
                local = reads[id(wanted[0][1])].result()
            else:
                local = torch.empty(box.lengths, dtype=dtype)
                for _, record in wanted:
                    copy_region(
                        local, box, reads[id(record)].result(), Box(tuple(record["offsets"]), tuple(record["lengths"]))
                    )
            value = _as_dtensor(local, live) if is_dtensor(live) else local
            state = put(state, tpath, value)
    return state


def _as_dtensor(local: torch.Tensor, live: Any) -> Any:
    from .mesh import _dtensor_type

    return _dtensor_type().from_local(
        local, live.device_mesh, live.placements, run_check=False, shape=live.shape, stride=live.stride()
    )


def read_component(directory: Path, manifest: Any, component: Any, *, verify: bool) -> Any:
    """``read_sharded`` for a ``StateComponent``: targets come from ``sharded_target(path, shape)``
    if the stateful has one (an optimizer whose state may not exist yet), else its state dict."""
    stateful = component.stateful
    if hasattr(stateful, "sharded_target"):
        target = stateful.sharded_target
    else:
        live = stateful.state_dict()
        target = lambda path, shape: get(live, path)  # noqa: E731
    return read_sharded(directory, manifest, component.key, target, verify=verify)


def read_full(directory: Path, manifest: Any, key: str) -> Any:
    """Every tensor of SHARDED component ``key`` as a full plain tensor, chunks read in parallel
    and verified (``async-ckpt export``; no process group needed)."""
    return read_sharded(directory, manifest, key, lambda path, shape: None, verify=True)


def layout_rows(manifest: Any, key: str) -> list[tuple[str, str, str, int, str]]:
    """``(fqn, global shape, dtype, chunks, writer ranks)`` per tensor of a SHARDED component (inspect)."""
    tensors: dict[str, list] = {}
    for entry in manifest.files_of(key).values():
        for record in entry.chunks or []:
            row = tensors.setdefault(record["fqn"], [record["shape"], record["dtype"], 0, set()])
            row[2] += 1
            row[3].add(entry.rank)
    return [
        (name, "x".join(map(str, shape)) or "()", dtype, count, ",".join(map(str, sorted(ranks))))
        for name, (shape, dtype, count, ranks) in sorted(tensors.items())
    ]
