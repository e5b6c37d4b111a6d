"""``checkpoint_manifest.json``: what a committed checkpoint holds, and checking files against it.

The manifest is written last, by rank 0, from every rank's report; its presence inside a
``checkpoint-N`` directory is what makes that directory complete. Pure data plus local file
reads; no communication.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from .layout import MANIFEST_NAME
from .storage import WrittenFile, hash_file, safe_member, write_file

FORMAT_VERSION = 2  # 2: SHARDED files carry chunk records; version 1 manifests read unchanged
MAX_MANIFEST_BYTES = 64 << 20  # a larger manifest is refused rather than parsed


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, as its writer reported it."""

    size: int  # bytes on disk
    xxh3: str  # xxh3-64 hex of the bytes on disk
    codec: str | None  # None or "zstd"
    rank: int  # the rank that wrote it
    component: str  # component key
    slot: str  # "global", "rank:N", "group:NAME:I", "node:N" or "shard:N"
    chunks: list[dict[str, Any]] | None = None  # SHARDED: one record per chunk (sharded_io)
    pickle: list | None = None  # SHARDED torch file: [start, end, xxh3] of its data.pkl record


@dataclass(frozen=True)
class ComponentEntry:
    """One component: the seed guide's fields plus the files that hold it."""

    key: str
    sharing_pattern: str
    ranks: list[int]  # ranks that wrote a file for it
    size_bytes: int  # total bytes on disk
    required: bool = False
    file_format: str = "torch"
    group: str | None = None
    files: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The whole manifest (unknown fields in the JSON are ignored on read)."""

    step: int
    world_size: int
    components: dict[str, ComponentEntry]
    files: dict[str, FileEntry]
    checkpoint_path: str = ""
    timestamp: str = ""
    pytorch_version: str = ""
    format_version: int = FORMAT_VERSION
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # rank -> phase -> seconds
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as indented JSON. Entries are flat, so a shallow conversion does what
        ``dataclasses.asdict`` does without its deep copy, which costs rank 0 at every commit."""
        top = {**vars(self), "components": {k: vars(c) for k, c in self.components.items()}, "files": {k: _file_json(f) for k, f in self.files.items()}}
        return json.dumps(top, indent=2, sort_keys=False)

    def files_of(self, component: str) -> dict[str, FileEntry]:
        return {name: entry for name, entry in self.files.items() if entry.component == component}


def _file_json(entry: FileEntry) -> dict[str, Any]:
    """A file entry as JSON: the SHARDED fields only where they are set (other files read as in version 1)."""
    out = vars(entry)
    if entry.chunks is None and entry.pickle is None:
        return {k: v for k, v in out.items() if k not in ("chunks", "pickle")}
    return out


def build_manifest(
    *, step: int, world_size: int, path: Path, components: list[dict[str, Any]], files: dict[str, FileEntry], timings: dict[str, dict[str, float]],
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    """Assemble the manifest on rank 0 from the component list and every rank's files (pure)."""
    entries = {}
    for comp in components:
        mine = {n: e for n, e in files.items() if e.component == comp["key"]}
        entries[comp["key"]] = ComponentEntry(
            key=comp["key"],
            sharing_pattern=comp["sharing_pattern"],
            ranks=sorted({e.rank for e in mine.values()}),
            size_bytes=sum(e.size for e in mine.values()),
            required=comp["required"],
            file_format=comp["file_format"],
            group=comp.get("group"),
            files=sorted(mine),
            metadata=dict(comp.get("metadata") or {}),
        )
    return Manifest(
        step=step,
        world_size=world_size,
        components=entries,
        files=dict(sorted(files.items())),
        checkpoint_path=str(path),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        pytorch_version=torch.__version__,
        timings=timings,
        metadata=dict(metadata or {}),
    )


def write_manifest(directory: Path, manifest: Manifest) -> WrittenFile:
    """Write the manifest atomically into ``directory`` (rank 0's commit thread; blocks on I/O)."""
    data = manifest.to_json().encode()
    return write_file(directory, MANIFEST_NAME, lambda sink: sink.write(data))


def read_manifest(checkpoint: str | Path) -> Manifest:
    """Read and check a checkpoint's manifest; raise a typed error naming the path on any problem."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"No checkpoint directory at {directory}")
    path = directory / MANIFEST_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointCorruptError(f"Refusing {path}: not a regular file")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{directory} has no {MANIFEST_NAME}: it was never committed or was damaged") from None
    if size > MAX_MANIFEST_BYTES:
        raise CheckpointCorruptError(f"Refusing {path}: {size} bytes is larger than any manifest we write")
    try:
        raw = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"Malformed manifest {path}: {exc}") from None
    return parse_manifest(raw, directory)


def parse_manifest(raw: Any, directory: Path) -> Manifest:
    """Turn decoded JSON into a ``Manifest``, refusing wrong types, newer formats and unsafe names."""
    where = directory / MANIFEST_NAME
    if not isinstance(raw, dict):
        raise CheckpointCorruptError(f"Malformed manifest {where}: top level is not an object")
    version = raw.get("format_version", 1)
    if not isinstance(version, int):
        raise CheckpointCorruptError(f"Malformed manifest {where}: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} has format_version {version}, newer than this async_ckpt understands ({FORMAT_VERSION}); upgrade async_ckpt to read it"
        )
    try:
        files = {str(name): _file_entry(entry) for name, entry in _dict(raw, "files").items()}
        components = {str(key): _component_entry(entry) for key, entry in _dict(raw, "components").items()}
        manifest = Manifest(
            step=_int(raw["step"]),
            world_size=_int(raw["world_size"]),
            components=components,
            files=files,
            checkpoint_path=str(raw.get("checkpoint_path", "")),
            timestamp=str(raw.get("timestamp", "")),
            pytorch_version=str(raw.get("pytorch_version", "")),
            format_version=version,
            timings=raw.get("timings") if isinstance(raw.get("timings"), dict) else {},
            metadata=raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointCorruptError(f"Malformed manifest {where}: {type(exc).__name__}: {exc}") from None
    for name in manifest.files:
        safe_member(directory, name)
    for comp in manifest.components.values():
        for name in comp.files:
            if name not in manifest.files:
                raise CheckpointCorruptError(f"Malformed manifest {where}: component '{comp.key}' lists unknown file {name!r}")
    return manifest


def check_files(directory: Path, manifest: Manifest, names: list[str] | None = None, *, check_hash: bool = True) -> tuple[list[str], list[str]]:
    """Check files against the manifest: return ``(missing, problems)``.

    A missing file may have been deleted on purpose (partial resume), so it is reported apart
    from files that are present but wrong (size, hash, not a regular file).
    """
    missing, problems = [], []
    for name in manifest.files if names is None else names:
        entry = manifest.files.get(name)
        if entry is None:
            problems.append(f"{directory / name}: not listed in the manifest")
            continue
        try:
            path = safe_member(directory, name)
        except CheckpointCorruptError as exc:
            problems.append(str(exc))
            continue
        if not path.exists():
            missing.append(name)
            continue
        actual = path.stat().st_size
        if actual != entry.size:
            problems.append(f"{path}: size {actual}, manifest says {entry.size}")
        elif check_hash and hash_file(path)[1] != entry.xxh3:
            problems.append(f"{path}: xxh3 does not match the manifest")
    return missing, problems


def _dict(raw: dict, key: str) -> dict:
    value = raw[key]
    if not isinstance(value, dict):
        raise TypeError(f"'{key}' is not an object")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _file_entry(entry: Any) -> FileEntry:
    if not isinstance(entry, dict):
        raise TypeError("file entry is not an object")
    codec = entry.get("codec")
    if codec not in (None, "zstd"):
        raise ValueError(f"unknown codec {codec!r}")
    xxh3 = entry["xxh3"]
    if not isinstance(xxh3, str):
        raise TypeError("xxh3 is not a string")
    chunks = entry.get("chunks")
    if chunks is not None:
        if not isinstance(chunks, list):
            raise TypeError("'chunks' is not a list")
        chunks = [_chunk_record(c) for c in chunks]
    pickle = entry.get("pickle")
    if pickle is not None and not (isinstance(pickle, list) and len(pickle) == 3 and isinstance(pickle[2], str)):
        raise TypeError("'pickle' is not [start, end, xxh3]")
    if pickle is not None:
        _span(pickle[:2])
    return FileEntry(
        size=_int(entry["size"]), xxh3=xxh3, codec=codec, rank=_int(entry["rank"]), component=str(entry["component"]), slot=str(entry["slot"]),
        chunks=chunks, pickle=pickle,
    )


_CHUNK_DTYPES = {str(t).removeprefix("torch.") for t in vars(torch).values() if isinstance(t, torch.dtype)}


def _chunk_record(record: Any) -> dict[str, Any]:
    """Check one SHARDED chunk record: a hostile manifest must not make a reader misbehave."""
    if not isinstance(record, dict):
        raise TypeError("chunk record is not an object")
    shape, offsets, lengths = ([_int(n) for n in record[k]] for k in ("shape", "offsets", "lengths"))
    if not (len(shape) == len(offsets) == len(lengths)) or any(o + n > s for o, n, s in zip(offsets, lengths, shape)):
        raise ValueError(f"chunk of {record.get('fqn')!r} does not fit its tensor")
    if record["dtype"] not in _CHUNK_DTYPES:
        raise ValueError(f"unknown dtype {record['dtype']!r}")
    start, end = _span(record["range"])
    numel = 1
    for n in lengths:
        numel *= n
    if end - start != numel * getattr(torch, record["dtype"]).itemsize:
        raise ValueError(f"byte range of {record.get('fqn')!r} does not match its shape")
    if not isinstance(record["path"], list) or not isinstance(record["fqn"], str) or not isinstance(record["xxh3"], str):
        raise TypeError("chunk path, fqn or xxh3 has the wrong type")
    return dict(record)


def _span(span: Any) -> tuple[int, int]:
    if not isinstance(span, list) or len(span) != 2:
        raise TypeError("byte range is not [start, end]")
    start, end = _int(span[0]), _int(span[1])
    if end < start:
        raise ValueError("byte range ends before it starts")
    return start, end


def _component_entry(entry: Any) -> ComponentEntry:
    if not isinstance(entry, dict):
        raise TypeError("component entry is not an object")
    files = entry.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise TypeError("component 'files' is not a list of names")
    return ComponentEntry(
        key=str(entry["key"]),
        sharing_pattern=str(entry["sharing_pattern"]),
        ranks=[_int(r) for r in entry.get("ranks", [])],
        size_bytes=_int(entry.get("size_bytes", 0)),
        required=bool(entry.get("required", False)),
        file_format=str(entry.get("file_format", "torch")),
        group=entry.get("group"),
        files=files,
        metadata=entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {},
    )
