"""The load half: pick the newest checkpoint that verifies, read this rank's files, restore.

Runs on the training thread. Reading, verifying and checking that every component fits
(``applying.check_states``) happen before any component is touched, so a damaged checkpoint is
skipped (auto-resume) or refused (explicit path, or one that does not fit) without leaving the
model half-loaded; ``applying.apply_all`` restores all components or none. Cross-rank agreement
is the manager's job (it gathers ``problems``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .applying import apply_all, check_states
from .components import SharingPattern, StateComponent
from .errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointLoadError, CheckpointNotFoundError
from .layout import list_committed, slot
from .manifest import Manifest, read_manifest
from .mesh import mesh_refusal
from .serialization import read_safetensors, read_torch
from .sharded_read import read_component
from .storage import read_file, safe_member
from .topology import Topology

logger = logging.getLogger(__name__)

_SHARED = (SharingPattern.GLOBAL, SharingPattern.REPLICATED)  # one file every rank reads


@dataclass(frozen=True)
class LoadResult:
    """What ``CheckpointManager.load`` restored."""

    step: int
    path: Path
    loaded: list[str] = field(default_factory=list)  # component keys restored
    skipped: list[str] = field(default_factory=list)  # optional components left as they were


@dataclass
class ReadPlan:
    """This rank's view of one candidate: decoded states, skips, and what is wrong with it."""

    manifest: Manifest | None = None
    states: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    damage: list[str] = field(default_factory=list)  # the checkpoint cannot be trusted
    refusal: list[str] = field(default_factory=list)  # it is fine, but cannot load into this job
    too_new: bool = False  # written by a newer async_ckpt (format_version)


def read_candidate(path: Path, components: list[StateComponent], topology: Topology, *, verify: bool, strict: bool) -> ReadPlan:
    """Read and check every file this rank needs from checkpoint ``path`` (no state is changed)."""
    plan = ReadPlan()
    try:
        plan.manifest = manifest = read_manifest(path)
    except CheckpointError as exc:
        plan.damage.append(str(exc))
        plan.too_new = isinstance(exc, CheckpointFormatError)
        return plan
    for component in components:
        where = slot(component, topology)
        entry = manifest.components.get(component.key)
        names = [n for n, f in manifest.files.items() if f.component == component.key and f.slot == where]
        if entry is not None and component.sharing_pattern is SharingPattern.SHARDED:  # any mesh: the overlapping chunks
            try:
                plan.states[component.key] = read_component(path, manifest, component, verify=verify)
            except CheckpointCorruptError as exc:
                plan.damage.append(f"component '{component.key}': {exc}")
            except CheckpointError as exc:
                plan.refusal.append(f"component '{component.key}': {exc}")
            continue
        resized = entry is not None and component.sharing_pattern not in _SHARED and manifest.world_size != topology.world_size
        rederive = resized and component.sharing_pattern is SharingPattern.PER_RANK and callable(getattr(component.stateful, "rederive", None))
        if rederive:  # per-rank RNG on another world size: derived from the saved streams (rng.py)
            where = f"rank:{topology.rank % manifest.world_size}"
            names = [n for n, f in manifest.files.items() if f.component == component.key and f.slot == where]
        elif resized:
            plan.refusal.append(
                f"component '{component.key}' was saved with world size {manifest.world_size}, this job has "
                f"{topology.world_size}; {component.sharing_pattern.value} state cannot be resharded: resume with "
                f"{manifest.world_size} ranks"
            )
            continue
        if entry is None or not names:
            reason = "not in the checkpoint's manifest" if entry is None else f"has no file for {where}"
            _absent(plan, component, reason, strict)
            continue
        name = names[0]
        file = safe_member(path, name)
        if not file.exists():
            _absent(plan, component, f"file {name} is listed in the manifest but missing (deleted for a partial resume?)", strict)
            continue
        info = manifest.files[name]
        try:
            data = read_file(file, size=info.size, xxh3=info.xxh3 if verify else None, codec=info.codec)
            plan.states[component.key] = read_safetensors(data, path=file) if ".safetensors" in name else read_torch(data, path=file)
            if rederive:
                plan.states[component.key] = component.stateful.rederive(plan.states[component.key], topology.rank, manifest.world_size)
        except CheckpointError as exc:
            plan.damage.append(f"component '{component.key}': {exc}")
    return plan


def _layout_bound(component: StateComponent) -> bool:
    """Whether ``component`` loads only on the mesh that saved it (per-rank, group or node state)."""
    if component.sharing_pattern in (*_SHARED, SharingPattern.SHARDED):
        return False
    return not (component.sharing_pattern is SharingPattern.PER_RANK and callable(getattr(component.stateful, "rederive", None)))


def _absent(plan: ReadPlan, component: StateComponent, reason: str, strict: bool) -> None:
    text = f"component '{component.key}' {reason}"
    if component.required:
        plan.damage.append(f"required {text}")
    elif strict:
        plan.refusal.append(f"{text}; pass strict=False to skip optional components")
    else:
        plan.skipped[component.key] = reason


def apply_states(plan: ReadPlan, components: list[StateComponent], path: Path, rank: int,
                 gather: Callable[[Any], list[Any]] = lambda x: [x]) -> LoadResult:
    """Restore every read component into its live object, or leave them all as they were (``applying``)."""
    assert plan.manifest is not None
    loaded = apply_all(plan.states, components, rank=rank, step=plan.manifest.step, path=path, gather=gather)
    for key, reason in plan.skipped.items():
        logger.warning("[rank %d step %d] skipped optional component '%s': %s", rank, plan.manifest.step, key, reason)
    return LoadResult(step=plan.manifest.step, path=path, loaded=loaded, skipped=sorted(plan.skipped))


def load_checkpoint(
    output_dir: Path,
    components: list[StateComponent],
    topology: Topology,
    *,
    checkpoint: str | os.PathLike[str] | None,
    strict: bool,
    verify: bool,
    mesh: Any,
    gather: Callable[[Any], list[Any]],
    broadcast: Callable[[Any], Any],
) -> LoadResult | None:
    """``CheckpointManager.load``: pick a checkpoint every rank agrees on, read it, restore it.

    Training thread, every rank. ``gather`` and ``broadcast`` are the manager's collectives on
    its coordination group; every decision (path visible, damaged, refused, a failed restore) is
    gathered so that all ranks raise the same error or load the same checkpoint.
    """
    explicit = checkpoint is not None
    if explicit:
        path = Path(checkpoint)  # type: ignore[arg-type]
        unseen = [r for r, seen in enumerate(gather(path.is_dir())) if not seen]
        if unseen:  # every rank raises, so none is left waiting in a collective
            raise CheckpointNotFoundError(f"no checkpoint at {path} (not visible to rank(s) {', '.join(map(str, unseen))})")
        candidates = [path]
    else:
        candidates = broadcast([p for _, p in reversed(list_committed(output_dir))])
    skipped_reasons = []
    for path in candidates:
        plan = read_candidate(path, components, topology, verify=verify, strict=strict)
        if any(_layout_bound(c) for c in components):  # SHARDED, shared and RNG state load on any mesh
            plan.refusal = mesh_refusal(plan.manifest, mesh) or plan.refusal  # another mesh: the one reason
        plan.refusal = plan.refusal or check_states(plan.states, components)  # fit checked before anything is touched
        verdicts = gather((plan.damage, plan.refusal, plan.too_new))
        damage = by_rank([v[0] for v in verdicts])
        refusal = by_rank([v[1] for v in verdicts])
        if damage:
            if explicit:
                error = CheckpointFormatError if any(v[2] for v in verdicts) else CheckpointCorruptError
                raise error(f"Checkpoint {path} cannot be read: " + "; ".join(damage))
            logger.warning("[rank %d] skipping damaged checkpoint %s: %s", topology.rank, path, "; ".join(damage))
            skipped_reasons.append(f"{path.name}: {damage[0]}")
            continue
        if refusal:
            raise CheckpointLoadError(f"Cannot load {path} into this job: " + "; ".join(refusal))
        result = apply_states(plan, components, path, topology.rank, gather)  # all or nothing, agreed by every rank
        logger.info("[rank %d step %d] loaded %s: loaded=%s skipped=%s", topology.rank, result.step, path, result.loaded, result.skipped)
        return result
    if skipped_reasons:
        raise CheckpointCorruptError(
            f"No committed checkpoint under {output_dir} verifies: " + "; ".join(skipped_reasons)
            + ". Delete them or load one explicitly after repairing it."
        )
    return None


def by_rank(per_rank: list[list[str]]) -> list[str]:
    """Each distinct message once, with the ranks that reported it (pure).

    ``[["m"], ["m"], ["x"]]`` -> ``["rank(s) 0-1: m", "rank(s) 2: x"]``: at 10,000 ranks a
    refusal every rank shares is one line, not ten thousand.
    """
    ranks: dict[str, list[int]] = {}
    for rank, messages in enumerate(per_rank):
        for message in messages:
            ranks.setdefault(message, []).append(rank)
    return [f"rank(s) {_spans(rs)}: {message}" for message, rs in ranks.items()]


def _spans(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans = []
    start = prev = ranks[0]
    for rank in ranks[1:]:
        if rank != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = rank
        prev = rank
    spans.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(spans)
