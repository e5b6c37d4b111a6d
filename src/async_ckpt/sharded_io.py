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
hash and one write per chunk). The training thread's halves are ``dtensor_chunks`` (what a rank
stages) and ``sharded_read`` (what a rank reads back).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import xxhash

from .errors import CheckpointConfigError, CheckpointCorruptError
from .serialization import _DTYPES, tensor_bytes, write_torch
from .storage import FileSink, WrittenFile, write_file


def write_shard(
    directory: Path, name: str, staged: Any, meta: list[dict[str, Any]], *, safetensors: bool, produce_hook: Any = None
) -> tuple[WrittenFile, list[dict], list | None]:
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
            raise CheckpointConfigError(f"dtype {tensor.dtype} of {key!r} has no safetensors code")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
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
            start = (
                info.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
            spans[info.filename.split("/", 1)[-1]] = (start, start + info.file_size)
    return spans


def _hash_range(path: Path, start: int, end: int) -> str:
    with open(path, "rb") as handle:
        return xxhash.xxh3_64_hexdigest(os.pread(handle.fileno(), end - start, start))


# ---------------------------------------- reading: the loader's pool threads call read_chunk


def read_chunk(path: Path, record: dict[str, Any], verify: bool) -> torch.Tensor:
    """Pread one chunk's bytes, check their xxh3, return them as a tensor of the chunk's shape."""
    start, end = record["range"]
    raw = torch.empty(end - start, dtype=torch.uint8)  # read straight into the tensor's memory
    data = raw.numpy()
    with open(path, "rb") as handle:
        got = os.preadv(handle.fileno(), [data], start) if end > start else 0
    if got != end - start:
        raise CheckpointCorruptError(
            f"Short read of {path} bytes {start}-{end} (tensor {record['fqn']}): the file is truncated"
        )
    if verify and xxhash.xxh3_64_hexdigest(data) != record["xxh3"]:
        raise CheckpointCorruptError(
            f"Hash mismatch for chunk {record['offsets']} of tensor {record['fqn']} in {path} (bytes {start}-{end}): "
            "the file is damaged; load an older checkpoint"
        )
    return raw.view(getattr(torch, record["dtype"])).reshape(record["lengths"])


def read_skeleton(path: Path, span: list, verify: bool) -> Any:
    """Rank 0's non-tensor structure from a torch shard file (its ``data.pkl`` verified first)."""
    if verify and _hash_range(path, span[0], span[1]) != span[2]:
        raise CheckpointCorruptError(f"Hash mismatch for the data.pkl record of {path}: the file is damaged")
    try:
        return torch.load(path, mmap=True, map_location="cpu", weights_only=True)["skeleton"]
    except Exception as exc:
        raise CheckpointCorruptError(f"Cannot read the structure of {path}: {type(exc).__name__}: {exc}") from None
