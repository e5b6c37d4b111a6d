"""``async-ckpt list``, ``inspect``, ``verify`` and ``clean``: the state of a run's checkpoints.

``checkpoint_state`` judges a committed directory from its manifest and file sizes; ``verify``
also reads every file's xxh3. ``list``, ``inspect`` and ``verify`` only read; ``clean`` renames
and deletes through ``rundir``, as the manager's start-up recovery and retention do.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import ownership, rundir
from ..errors import CheckpointError, CheckpointLockError
from ..layout import MANIFEST_NAME, checkpoint_dirname, list_committed, list_leftovers, parse_step
from ..manifest import Manifest, check_files, read_manifest
from ..retention import select_for_deletion
from .common import CliError, human, table

RECENT_S = 600.0  # clean keeps leftovers touched this recently unless --force: a save may own them


# --------------------------------------------------------------------------------------- list


def checkpoint_state(path: Path) -> tuple[str, Manifest | None, str]:
    """``(state, manifest, note)`` of a committed directory, from its manifest and file sizes.

    "damaged": the manifest does not read, a file has the wrong size, or a required component's
    file is missing (resume skips it). "partial": files of optional components are missing
    (deleted for a partial resume). "committed": everything is there at its recorded size.
    Hashes are not read: ``verify`` does that.
    """
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return "damaged", None, str(exc)
    missing, bad = _check(path, manifest, hashes=False)
    required = [n for n in missing if _required(manifest, n)]
    if bad:
        return "damaged", manifest, "wrong size: " + _names(bad)
    if required:
        return "damaged", manifest, "required file missing: " + _names(required)
    if missing:
        return "partial", manifest, "missing: " + _names(missing)
    return "committed", manifest, ""


def _check(path: Path, manifest: Manifest, *, hashes: bool) -> tuple[list[str], dict[str, str]]:
    """Missing file names, and ``{name: problem}`` for files present but wrong."""
    missing, bad = [], {}
    for name in manifest.files:
        gone, problems = check_files(path, manifest, [name], check_hash=hashes)
        missing += gone
        if problems:
            bad[name] = problems[0]
    return missing, bad


def _required(manifest: Manifest, name: str) -> bool:
    component = manifest.components.get(manifest.files[name].component)
    return component is None or component.required


def _names(names: Any) -> str:
    names = sorted(names)
    return ", ".join(names[:2]) + (f" (+{len(names) - 2})" if len(names) > 2 else "")


def cmd_list(args: argparse.Namespace) -> int:
    root = _run_dir(args.dir)
    entries, picked = [], False
    for step, path in reversed(list_committed(root)):
        state, manifest, note = checkpoint_state(path)
        resume = not picked and state != "damaged"
        picked = picked or resume
        size = sum(f.size for f in manifest.files.values()) if manifest else _du(path)
        entries.append({"name": path.name, "step": step, "state": state, "size_bytes": size, "mtime": path.stat().st_mtime,
                        "world_size": manifest.world_size if manifest else None, "resume": resume, "note": note})
    for left in list_leftovers(root):
        entries.append({"name": left.path.name, "step": left.step, "state": left.kind, "size_bytes": _du(left.path),
                        "mtime": _last_touched(left.path), "world_size": None, "resume": False, "note": ""})
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no checkpoints under {root}", file=sys.stderr)
        return 0
    rows = [(e["name"], str(e["step"]), e["state"], human(e["size_bytes"]), _age(e["mtime"]),
             "" if e["world_size"] is None else str(e["world_size"]), _mark(e["resume"], e["note"])) for e in entries]
    table(["name", "step", "state", "size", "age", "world", ""], rows)
    return 0


def _mark(resume: bool, note: str) -> str:
    if not resume:
        return note
    return f"<- resume ({note})" if note else "<- resume"


# ------------------------------------------------------------------------------------ inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.checkpoint
    if not (path / MANIFEST_NAME).exists() and list_committed(path):
        newest = list_committed(path)[-1][1]
        raise CliError(f"{path} is a run directory, not a checkpoint; inspect one of its checkpoints, e.g. {newest}")
    manifest = read_manifest(path)
    if args.json:
        print(manifest.to_json())
        return 0
    total = sum(f.size for f in manifest.files.values())
    print(f"{path}: step {manifest.step}, world size {manifest.world_size}, {len(manifest.files)} files, {human(total)}")
    print(f"written {manifest.timestamp or '?'} by torch {manifest.pytorch_version or '?'}, format {manifest.format_version}")
    if path.name.startswith(".checkpoint-"):
        print("note: this is a leftover of an interrupted save, not a committed checkpoint")
    print()
    rows = [(c.key, c.sharing_pattern + (f"({c.group})" if c.group else ""), _ranks(c.ranks), human(c.size_bytes),
             "yes" if c.required else "no", c.file_format) for c in manifest.components.values()]
    table(["component", "pattern", "ranks", "size", "required", "format"], rows)
    print()
    rows = [(name, f.component, f.slot, human(f.size), f.codec or "-", f.xxh3) for name, f in manifest.files.items()]
    table(["file", "component", "slot", "size", "codec", "xxh3"], rows)
    for comp in (c for c in manifest.components.values() if c.sharing_pattern == "sharded"):
        from ..sharded_read import layout_rows

        print(f"\nsharded component '{comp.key}': global shapes and saved layout")
        table(["tensor", "global shape", "dtype", "chunks", "written by"], layout_rows(manifest, comp.key))
    if manifest.timings:
        print()
        phases = sorted({p for t in manifest.timings.values() for p in t})
        rows = [(rank, *(f"{1000 * t[p]:.1f}" if p in t else "-" for p in phases))
                for rank, t in sorted(manifest.timings.items(), key=lambda kv: int(kv[0]))]
        table(["rank", *(p.removesuffix("_s") + " ms" for p in phases)], rows)
    return 0


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks)) or "-"


# ------------------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    path = args.path
    if not path.is_dir():
        raise CliError(f"no such checkpoint or run directory: {path}")
    committed = list_committed(path)
    if committed and not (path / MANIFEST_NAME).exists():
        targets = [p for _, p in committed]
    elif (path / MANIFEST_NAME).exists() or parse_step(path.name) is not None or path.name.startswith(".checkpoint-"):
        targets = [path]
    else:
        raise CliError(f"no checkpoints under {path}")
    bad = [target for target in targets if not _verify_one(target, max(1, args.threads), args.verbose)]
    if len(targets) > 1:
        print(f"{len(targets) - len(bad)} of {len(targets)} checkpoints verified" + (f"; damaged: {', '.join(p.name for p in bad)}" if bad else ""))
    return 1 if bad else 0


def _verify_one(path: Path, threads: int, each: bool = False) -> bool:
    """Hash every file of one checkpoint on ``threads`` threads; print OK/BAD lines; True when good.

    ``each``: also print a line for every good file.
    """
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        print(f"BAD  {path}: {exc}")
        return False
    started = time.monotonic()
    names = sorted(manifest.files, key=lambda n: -manifest.files[n].size)  # big files first
    total, done_bytes, missing, bad = sum(f.size for f in manifest.files.values()), 0, [], {}
    progress = sys.stderr.isatty()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = {pool.submit(check_files, path, manifest, [name]): name for name in names}
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            name = futures[future]
            gone, problems = future.result()
            missing += gone
            if problems:
                bad[name] = problems[0]
            done_bytes += manifest.files[name].size
            if progress:
                print(f"\r  {path.name}: {count}/{len(names)} files, {human(done_bytes)} of {human(total)}   ", end="", file=sys.stderr, flush=True)
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    for name in sorted(missing):
        component = manifest.files[name].component
        if _required(manifest, name):
            bad[name] = f"{path / name}: missing, and component '{component}' is required"
        else:
            print(f"MISSING {path / name} (optional component '{component}': deleted for a partial resume?)")
    if each:
        for name in sorted(set(names) - set(bad) - set(missing)):
            print(f"ok   {path / name}: {human(manifest.files[name].size)}, xxh3 {manifest.files[name].xxh3}")
    for name in sorted(bad):
        print(f"BAD  {bad[name]}")
    if bad:
        print(f"BAD  {path}: {len(bad)} of {len(names)} files damaged")
        return False
    partial = f" ({len(missing)} optional missing)" if missing else ""
    present = total - sum(manifest.files[name].size for name in missing)
    print(f"OK   {path}: {len(names) - len(missing)} files{partial}, {human(present)}, {time.monotonic() - started:.2f} s")
    return True


# -------------------------------------------------------------------------------------- clean


def cmd_clean(args: argparse.Namespace) -> int:
    root = _run_dir(args.dir)
    if args.keep is not None and args.keep < 1:
        raise CliError("--keep must be at least 1 (the newest checkpoint is never removed)")
    try:  # a live job's directories are never touched: clean runs only while it owns the directory
        owned = ownership.acquire(root, 0, renew=False)
    except CheckpointLockError as exc:
        raise CliError(f"{exc}; clean does nothing while a job owns the directory") from None
    try:
        return _clean(root, args)
    finally:
        owned.release()


def _clean(root: Path, args: argparse.Namespace) -> int:
    verb = "would remove" if args.dry_run else "removed"
    acted, failed = False, False
    for item in rundir.plan_recovery(root):
        left = item.leftover
        idle = time.time() - _last_touched(left.path)
        if idle < RECENT_S and not args.force:
            print(f"kept {left.path} ({left.kind}, touched {idle:.0f} s ago: a save may still be running; --force removes it)")
            continue
        acted = True
        if not args.dry_run:
            try:
                rundir.repair(item)
            except OSError as exc:
                print(f"could not {item.action} {left.path}: {exc}", file=sys.stderr)
                failed = True
                continue
        if item.action == "restore":  # a re-save crashed between its two renames
            print(f"{'would restore' if args.dry_run else 'restored'} {item.target} (from {left.path.name}, an interrupted re-save)")
        else:
            print(f"{verb} {left.path} ({left.kind} leftover)")
    if args.keep is not None:
        committed = list_committed(root)
        resume = next((step for step, path in reversed(committed) if checkpoint_state(path)[0] != "damaged"), None)
        for step in select_for_deletion([s for s, _ in committed], args.keep, protected=[] if resume is None else [resume]):
            acted = True
            if not args.dry_run:
                try:
                    rundir.delete(root, step)
                except FileNotFoundError:  # retention of a running job got there first
                    continue
                except OSError as exc:  # renamed out of its name, but files stay: the next clean retries
                    print(f"could not remove {root / checkpoint_dirname(step)}: {exc}", file=sys.stderr)
                    failed = True
                    continue
            print(f"{verb} {root / checkpoint_dirname(step)}")
    if not acted:
        print("nothing to remove")
    return 1 if failed else 0


def _last_touched(path: Path) -> float:
    """The newest mtime of a directory and its direct entries (a save in progress touches them)."""
    times = [path.lstat().st_mtime]
    for entry in path.iterdir():
        try:
            times.append(entry.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


# ------------------------------------------------------------------------------------ helpers


def _run_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CliError(f"no such directory: {path}")
    if (path / MANIFEST_NAME).exists():
        raise CliError(f"{path} is a checkpoint, not a run directory; pass its parent {path.parent}")
    return path


def _age(mtime: float) -> str:
    seconds = max(0.0, time.time() - mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
