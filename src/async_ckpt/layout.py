"""Names on disk: checkpoint and staging directories, component files, and listing them.

Pure naming plus read-only directory listing; nothing here writes or talks to other ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .components import FileFormat, SharingPattern, StateComponent

if TYPE_CHECKING:  # annotations only: topology imports torch.distributed, which writer threads never do
    from .topology import Topology

MANIFEST_NAME = "checkpoint_manifest.json"
ZSTD_SUFFIX = ".zst"
TMP_SUFFIX = ".tmp"
LOCK_NAME = "async_ckpt.lock"  # ownership of the run directory (ownership.py)

_COMMITTED = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.checkpoint-(\d+)\.(staging|deleting|replaced)-([0-9A-Za-z_-]+)$")


def checkpoint_dirname(step: int) -> str:
    """``checkpoint-<step>``: the committed name; it exists only when the checkpoint is complete."""
    return f"checkpoint-{int(step)}"


def staging_dirname(step: int, token: str) -> str:
    """``.checkpoint-<step>.staging-<token>``: a save in progress; never read."""
    return f".checkpoint-{int(step)}.staging-{token}"


def trash_dirname(step: int, token: str, kind: str = "deleting") -> str:
    """A committed checkpoint moved out of its name before its files are deleted or replaced."""
    assert kind in ("deleting", "replaced"), kind
    return f".checkpoint-{int(step)}.{kind}-{token}"


def parse_step(name: str) -> int | None:
    """The step of a committed directory name, or None for anything else."""
    match = _COMMITTED.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Leftover:
    """A directory a save or a deletion left behind (staging, deleting or replaced)."""

    path: Path
    step: int
    kind: str  # "staging" | "deleting" | "replaced"
    token: str


def list_committed(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``output_dir`` as ``(step, path)``, oldest step first.

    Ordered by the step in the name, never by mtime. Symlinks and files named like a
    checkpoint are ignored.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        step = parse_step(entry.name)
        if step is not None and entry.is_dir() and not entry.is_symlink():
            found.append((step, entry))
    return sorted(found, key=lambda item: item[0])


def list_leftovers(output_dir: str | Path) -> list[Leftover]:
    """Staging and trash directories under ``output_dir``."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append(Leftover(entry, int(match.group(1)), match.group(2), match.group(3)))
    return sorted(found, key=lambda item: (item.step, item.kind, item.token))


def file_stem(component: StateComponent, topology: Topology) -> str:
    """File name without extension for this rank's share of ``component`` (DESIGN.md section 2)."""
    key, pattern = component.key, component.sharing_pattern
    if pattern is SharingPattern.PER_RANK and topology.world_size > 1:
        return f"{key}_state_rank_{topology.rank}"
    if pattern is SharingPattern.PER_GROUP:
        assert component.group is not None
        return f"{key}_state_group_{component.group}_{topology.place(component.group).index}"
    if pattern is SharingPattern.PER_NODE:
        return f"{key}_state_node_{topology.node}"
    if pattern is SharingPattern.SHARDED:
        return f"{key}_state_shard_{topology.rank}"
    return "model" if key == "model" else f"{key}_state"


def file_name(component: StateComponent, topology: Topology, compressed: bool = False) -> str:
    """Full file name of this rank's share of ``component``, with ``.zst`` when compressed."""
    ext = ".safetensors" if component.file_format is FileFormat.SAFETENSORS else ".pt"
    return file_stem(component, topology) + ext + (ZSTD_SUFFIX if compressed else "")


def writes(component: StateComponent, topology: Topology) -> bool:
    """Whether this rank writes a file for ``component`` (exactly one writer per file)."""
    pattern = component.sharing_pattern
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return topology.is_rank0
    if pattern in (SharingPattern.PER_RANK, SharingPattern.SHARDED):
        return True
    if pattern is SharingPattern.PER_GROUP:
        assert component.group is not None
        return topology.place(component.group).rank == 0
    return topology.local_rank == 0  # PER_NODE


def slot(component: StateComponent, topology: Topology) -> str:
    """Which share of a component this rank's file is, as recorded in the manifest."""
    pattern = component.sharing_pattern
    if pattern is SharingPattern.PER_RANK:
        return f"rank:{topology.rank}"
    if pattern is SharingPattern.PER_GROUP:
        assert component.group is not None
        return f"group:{component.group}:{topology.place(component.group).index}"
    if pattern is SharingPattern.PER_NODE:
        return f"node:{topology.node}"
    if pattern is SharingPattern.SHARDED:
        return f"shard:{topology.rank}"
    return "global"
