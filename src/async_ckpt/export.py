"""``async-ckpt export``: one plain ``model.safetensors`` from a checkpoint's model files.

Reads every file of a component (one per pipeline stage, plain or zstd, safetensors or torch),
checking sizes and hashes, merges them into one flat dict and writes it with stock safetensors,
atomically. Runs outside any training job; called by ``cli.cmd_export``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import CheckpointError
from .manifest import Manifest, read_manifest
from .serialization import read_safetensors, read_torch, split_aliases
from .storage import read_file

logger = logging.getLogger(__name__)


class ExportError(CheckpointError):
    """The checkpoint cannot be exported as asked (missing component, clashing names, ...)."""


@dataclass(frozen=True)
class Exported:
    path: Path  # the file written
    tensors: int  # tensors stored
    sources: list[str]  # checkpoint files merged
    aliases: dict[str, str]  # tied names: {alias: stored name}
    step: int


def export_model(checkpoint: Path, out: Path, *, component: str = "model", duplicate_tied: bool = False, force: bool = False) -> Exported:
    """Write ``component`` of ``checkpoint`` as one safetensors file at ``out`` (a file or a folder).

    Tied tensors are stored once with ``{alias: kept}`` in the metadata, as
    ``safetensors.torch.save_model`` writes and ``load_model`` / Hugging Face loaders re-tie;
    ``duplicate_tied=True`` stores a copy under every name instead.
    """
    manifest = read_manifest(checkpoint)
    entry = manifest.components.get(component)
    if entry is None or not entry.files:
        raise ExportError(f"{checkpoint} has no component '{component}' (components: {', '.join(manifest.components) or 'none'})")
    out = out if out.suffix == ".safetensors" else out / "model.safetensors"
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    merged, sources = merge_files(checkpoint, manifest, component)
    if not merged:
        raise ExportError(f"component '{component}' of {checkpoint} holds no tensors at its top level: nothing to export")
    tensors, aliases = _untie(merged)
    metadata = {"format": "pt"}
    if duplicate_tied:
        tensors.update({alias: tensors[kept].clone() for alias, kept in aliases.items()})
    else:
        metadata.update(aliases)  # {dropped name: kept name}, as safetensors.torch.save_model writes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(path=out, tensors=len(tensors), sources=sources, aliases=aliases, step=manifest.step)


def merge_files(path: Path, manifest: Manifest, component: str) -> tuple[dict[str, Any], list[str]]:
    """One flat ``{name: tensor}`` from every file of ``component`` (e.g. one per pipeline stage).

    Each file is read through ``storage.read_file``, so its size and xxh3 are checked and zstd is
    decompressed. Names must be unique across files; a name in two files is accepted only when
    both hold the same tensor (replicas), and refused otherwise.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    names = sorted(manifest.files_of(component), key=lambda n: (manifest.files[n].rank, n))
    if manifest.components[component].sharing_pattern == "sharded":  # full tensors from every rank's chunks
        from .sharded_read import read_full

        return read_full(path, manifest, component), names
    for name in names:
        info = manifest.files[name]
        file = path / name
        if not file.exists():
            raise ExportError(f"{file} is listed in the manifest but missing; cannot export '{component}' without it")
        data = read_file(file, size=info.size, xxh3=info.xxh3, codec=info.codec)
        state = read_safetensors(data, path=file) if ".safetensors" in name else read_torch(data, path=file)
        if not isinstance(state, dict):
            raise ExportError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
        for key, value in sorted(state.items(), key=lambda kv: str(kv[0])):  # safetensors' order varies
            if not isinstance(value, torch.Tensor):
                logger.warning("export: skipping %r of %s: a %s, not a tensor", key, name, type(value).__name__)
                continue
            key = str(key)
            if key in merged:
                other = merged[key]
                if other.dtype != value.dtype or other.shape != value.shape or not torch.equal(other, value):
                    raise ExportError(f"'{key}' is in both {origin[key]} and {name} with different values: export merges stages "
                                   "whose names are unique (full module paths) and identical replicas, not stages named "
                                   "relative to themselves or tensor-parallel shards")
                continue
            merged[key], origin[key] = value, name
    return merged, names


def _untie(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Keep the first name of each tied tensor; return ``(tensors, {alias: kept name})``.

    Tensors that only partly share memory with another one are cloned, since a safetensors file
    cannot hold overlapping tensors.
    """
    stored, aliases = split_aliases(state)
    users: dict[int, int] = {}  # storage address -> tensors kept that live in it
    for tensor in stored.values():
        if tensor.numel():
            users[tensor.untyped_storage().data_ptr()] = users.get(tensor.untyped_storage().data_ptr(), 0) + 1
    out = {}
    for name, tensor in stored.items():
        alone = not tensor.numel() or (
            users[tensor.untyped_storage().data_ptr()] == 1 and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
        )
        out[name] = tensor.contiguous() if alone else tensor.clone(memory_format=torch.contiguous_format)
    return out, aliases
