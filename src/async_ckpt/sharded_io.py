"""SHARDED files: write a rank's chunks with per-chunk hashes, read back only what overlaps.

Each rank writes one file per SHARDED component (``<key>_state_shard_<rank>``): safetensors
(``{dotted name: local chunk}``, what stock readers open) or a torch file
(``{"chunks": {dotted name: chunk}, "skeleton": the non-tensor structure, rank 0 only}``). The
writer returns one record per chunk (manifest ``files[name].chunks``): the tensor's key path and
dotted name, global shape, dtype, the chunk's ``offsets`` and ``lengths``, its byte ``range`` in
the file and the xxh3 of those bytes, so a reader on any mesh preads and verifies one chunk
without reading or hashing the whole file. Torch files also record the byte range and hash of
their ``data.pkl`` record (``files[name].pickle``).

``write_shard`` runs on a background I/O thread (no collectives, no per-tensor Python beyond one
hash and one write per chunk); ``read_sharded`` runs on the training thread at load.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash

from .errors import CheckpointCorruptError, CheckpointLoadError
from .serialization import _DTYPES, tensor_bytes, write_torch
from .sharding import Box, copy_region, covered, get, is_dtensor, local_box, put, walk
from .storage import FileSink, WrittenFile, safe_member, write_file

READ_THREADS = 4  # chunks read at once by one rank


def chunk_meta(chunks: Sequence[Any]) -> list[dict[str, Any]]:
    """The manifest fields known before writing (training thread, from ``sharding.plan_chunks``)."""
    return [
        {"path": list(c.path), "fqn": c.name, "shape": list(c.global_shape), "offsets": list(c.box.offsets), "lengths": list(c.box.lengths)}
        for c in chunks
    ]


def staged_state(chunks: Sequence[Any], values: Sequence[tuple], state: Any, safetensors: bool, rank: int) -> Any:
    """What the staging pool copies: the chunk tensors (and rank 0's skeleton for torch files)."""
    tensors = {c.name: c.local for c in chunks}
    if safetensors:
        if values:
            path, value = values[0]
            raise CheckpointLoadError(f"entry {'.'.join(map(str, path))!r} is a {type(value).__name__}, not a tensor: "
                                      "a safetensors SHARDED component holds tensors only; use file_format='torch'")
        return tensors
    from .sharding import skeleton

    return {"chunks": tensors, "skeleton": skeleton(state) if rank == 0 else None}


def write_shard(directory: Path, name: str, staged: Any, meta: list[dict[str, Any]], *, safetensors: bool, produce_hook: Any = None) -> tuple[WrittenFile, list[dict], list | None]:
    """Write one rank's chunks into ``directory/name``; return the file and its chunk records.

    Background I/O thread. ``staged`` is ``staged_state``'s result after staging; ``meta`` the
    matching ``chunk_meta``. Files are never compressed (a ranged read needs the raw bytes).
    """
    tensors = staged if safetensors else staged["chunks"]
    records = [dict(m) for m in meta]
    for record, tensor in zip(records, tensors.values()):
        record["dtype"] = str(tensor.dtype).removeprefix("torch.")
        record["xxh3"] = xxhash.xxh3_64_hexdigest(tensor_bytes(tensor.contiguous()))
    if safetensors:
        header, ranges = _safetensors_header(tensors)
        for record, span in zip(records, ranges):
            record["range"] = span

        def produce(sink: FileSink) -> None:
            sink.write(header)
            if produce_hook is not None:
                produce_hook()
            for tensor in tensors.values():
                sink.write(tensor_bytes(tensor.contiguous()))

        return write_file(directory, name, produce), records, None

    def produce_torch(sink: FileSink) -> None:
        write_torch(sink, staged, component=name)
        if produce_hook is not None:
            produce_hook()

    written = write_file(directory, name, produce_torch)
    spans = _zip_records(directory / name)
    keys: dict[int, str] = {}
    for record, tensor in zip(records, tensors.values()):
        key = keys.setdefault(tensor.untyped_storage()._cdata, str(len(keys)))  # torch.save's storage keys
        start = spans[f"data/{key}"][0] + tensor.storage_offset() * tensor.element_size()
        record["range"] = [start, start + tensor.numel() * tensor.element_size()]
    if staged["skeleton"] is None:
        return written, records, None
    pkl = spans["data.pkl"]  # rank 0's: the structure every loader reads
    return written, records, [pkl[0], pkl[1], _hash_range(directory / name, pkl[0], pkl[1])]


def _safetensors_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[list[int]]]:
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise CheckpointLoadError(f"dtype {tensor.dtype} of {key!r} has no safetensors code")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    base = 8 + len(encoded)
    ranges = [[base + h["data_offsets"][0], base + h["data_offsets"][1]] for h in header.values()]
    return struct.pack("<Q", len(encoded)) + encoded, ranges


def _zip_records(path: Path) -> dict[str, tuple[int, int]]:
    """``{record name without the archive prefix: (first byte, end)}`` of a torch file (stored records)."""
    spans = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            handle.seek(info.header_offset)
            local = handle.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            spans[info.filename.split("/", 1)[-1]] = (start, start + info.file_size)
    return spans


def _hash_range(path: Path, start: int, end: int) -> str:
    with open(path, "rb") as handle:
        return xxhash.xxh3_64_hexdigest(os.pread(handle.fileno(), end - start, start))


# ----------------------------------------------------------------------------------------- read


def read_chunk(path: Path, record: dict[str, Any], verify: bool) -> torch.Tensor:
    """Pread one chunk's bytes, check their xxh3, return them as a tensor of the chunk's shape."""
    start, end = record["range"]
    with open(path, "rb") as handle:
        data = os.pread(handle.fileno(), end - start, start)
    if len(data) != end - start:
        raise CheckpointCorruptError(f"Short read of {path} bytes {start}-{end} (tensor {record['fqn']}): the file is truncated")
    if verify and xxhash.xxh3_64_hexdigest(data) != record["xxh3"]:
        raise CheckpointCorruptError(
            f"Hash mismatch for chunk {record['offsets']} of tensor {record['fqn']} in {path} (bytes {start}-{end}): "
            "the file is damaged; load an older checkpoint"
        )
    dtype = getattr(torch, record["dtype"])
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return flat.reshape(record["lengths"])


def read_skeleton(path: Path, span: list, verify: bool) -> Any:
    """Rank 0's non-tensor structure from a torch shard file (its ``data.pkl`` verified first)."""
    if verify and _hash_range(path, span[0], span[1]) != span[2]:
        raise CheckpointCorruptError(f"Hash mismatch for the data.pkl record of {path}: the file is damaged")
    try:
        return torch.load(path, mmap=True, map_location="cpu", weights_only=True)["skeleton"]
    except Exception as exc:
        raise CheckpointCorruptError(f"Cannot read the structure of {path}: {type(exc).__name__}: {exc}") from None


def read_sharded(directory: Path, manifest: Any, key: str, target: Callable[[tuple, tuple], Any], *, verify: bool) -> Any:
    """Read the saved chunks that overlap this rank's live shards of component ``key``.

    Training thread, at load, before anything is applied. ``target(path, global shape)`` is the
    live tensor a saved one becomes (or None): a DTensor target makes it a DTensor placed like
    it (``from_local``, no communication); any other saved tensor is read in full. Raises ``CheckpointCorruptError`` for damaged bytes,
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
            by_name.setdefault(record["fqn"], []).append((path, record))
        if entry.pickle:
            structure = read_skeleton(path, entry.pickle, verify)
    plans = []
    for name, chunks in by_name.items():
        first = chunks[0][1]
        tpath, shape = tuple(first["path"]), tuple(first["shape"])
        live = target(tpath, shape)
        if isinstance(live, torch.Tensor) and tuple(live.shape) != shape:
            raise CheckpointLoadError(f"tensor {name} of component '{key}' has global shape {shape} in the checkpoint but {tuple(live.shape)} here")
        box = local_box(live) if is_dtensor(live) else Box((0,) * len(shape), shape)
        wanted = [(p, r) for p, r in chunks if covered([Box(tuple(r["offsets"]), tuple(r["lengths"]))], box)]
        if covered([Box(tuple(r["offsets"]), tuple(r["lengths"])) for _, r in wanted], box) != max(1, box.numel) and box.numel:
            raise CheckpointCorruptError(f"the saved chunks of tensor {name} (component '{key}') do not cover the region {box} this rank needs")
        plans.append((tpath, live, box, getattr(torch, first["dtype"]), wanted))
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="async_ckpt-read") as pool:
        reads = {id(r): pool.submit(read_chunk, p, r, verify) for _, _, _, _, wanted in plans for p, r in wanted}
        state: Any = {} if structure is None else structure
        for tpath, live, box, dtype, wanted in plans:
            local = torch.empty(box.lengths, dtype=dtype)
            for _, record in wanted:
                copy_region(local, box, reads[id(record)].result(), Box(tuple(record["offsets"]), tuple(record["lengths"])))
            value = _as_dtensor(local, live) if is_dtensor(live) else local
            state = put(state, tpath, value)
    return state


def _as_dtensor(local: torch.Tensor, live: Any) -> Any:
    from .mesh import _dtensor_type

    return _dtensor_type().from_local(local, live.device_mesh, live.placements, run_check=False, shape=live.shape, stride=live.stride())


def leaves(state: Any) -> list[tuple[tuple, Any]]:
    """Every leaf of a state tree (used by tests and export)."""
    return list(walk(state))


def shard_state(state: Any, rank: int, *, safetensors: bool) -> tuple[Any, list[dict[str, Any]]]:
    """This rank's share of a live SHARDED state, to stage, and its chunk records so far.

    Training thread, inside ``save()``: local shards only (``to_local``), no gather and no
    collective; the staging pool then copies them like any other tensors.
    """
    from .sharding import plan_chunks

    chunks, values = plan_chunks(state, rank)
    return staged_state(chunks, values, state, safetensors, rank), chunk_meta(chunks)


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
