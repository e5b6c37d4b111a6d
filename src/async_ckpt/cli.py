"""The ``async-ckpt`` command: list, inspect, verify and clean checkpoints.

Exit codes: 0 success, 1 a checkpoint is damaged or an expected error occurred (message on
stderr, no traceback), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .errors import CheckpointError
from .layout import list_committed, list_leftovers
from .manifest import Manifest, check_files, read_manifest
from .retention import clean_leftovers, delete_checkpoint, select_for_deletion


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as exc:
        print(f"async-ckpt: {exc}", file=sys.stderr)
        return 1
    except (BrokenPipeError, KeyboardInterrupt):
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="async-ckpt", description="Inspect and maintain async_ckpt checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list checkpoints under a run directory")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("inspect", help="show a checkpoint's manifest")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="check sizes and xxh3 of every file (a checkpoint or a run directory)")
    p.add_argument("path", type=Path)
    p.add_argument("--threads", type=int, default=4, help="parallel file reads (default 4)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("clean", help="remove staging leftovers and, with --keep, old checkpoints")
    p.add_argument("dir", type=Path)
    p.add_argument("--keep", type=int, default=None, help="keep the newest N committed checkpoints")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_clean)
    return parser


def _state(path: Path) -> tuple[str, Manifest | None]:
    """"committed" when the manifest reads and every file has its recorded size, else "damaged"."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return "damaged", None
    missing, problems = check_files(path, manifest, check_hash=False)
    if problems:
        return "damaged", manifest
    return ("partial" if missing else "committed"), manifest


def cmd_list(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise CheckpointError(f"no such directory: {args.dir}")
    rows = []
    picked = False
    for step, path in reversed(list_committed(args.dir)):
        state, manifest = _state(path)
        mark = ""
        if not picked and state in ("committed", "partial"):
            mark, picked = "<- resume", True
        size = sum(f.size for f in manifest.files.values()) if manifest else _du(path)
        world = str(manifest.world_size) if manifest else "?"
        rows.append((path.name, str(step), state, _human(size), _age(path), world, mark))
    for left in list_leftovers(args.dir):
        rows.append((left.path.name, str(left.step), left.kind, _human(_du(left.path)), _age(left.path), "", ""))
    _table(["name", "step", "state", "size", "age", "world", ""], rows)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.checkpoint)
    if args.json:
        print(json.dumps(asdict(manifest), indent=2))
        return 0
    print(f"checkpoint {args.checkpoint}  step {manifest.step}  world size {manifest.world_size}  "
          f"format {manifest.format_version}  torch {manifest.pytorch_version}  {manifest.timestamp}")
    rows = [(c.key, c.sharing_pattern, ",".join(map(str, c.ranks)), _human(c.size_bytes), "yes" if c.required else "", c.file_format) for c in manifest.components.values()]
    _table(["component", "pattern", "ranks", "size", "required", "format"], rows)
    print()
    rows = [(name, f.component, f.slot, str(f.rank), _human(f.size), f.codec or "-", f.xxh3) for name, f in manifest.files.items()]
    _table(["file", "component", "slot", "rank", "size", "codec", "xxh3"], rows)
    if manifest.timings:
        print()
        phases = sorted({p for t in manifest.timings.values() for p in t})
        rows = [(rank, *(f"{1000 * t.get(p, 0.0):.1f}" for p in phases)) for rank, t in sorted(manifest.timings.items(), key=lambda kv: int(kv[0]))]
        _table(["rank", *(f"{p} (ms)" for p in phases)], rows)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    targets = [args.path] if (args.path / "checkpoint_manifest.json").exists() or not args.path.is_dir() else [p for _, p in list_committed(args.path)]
    if not targets:
        raise CheckpointError(f"no checkpoints under {args.path}")
    bad = 0
    for target in targets:
        bad += _verify_one(target, args.threads)
    return 1 if bad else 0


def _verify_one(path: Path, threads: int) -> int:
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        print(f"BAD  {path}: {exc}")
        return 1
    names = list(manifest.files)
    started, done, problems, missing = time.monotonic(), 0, [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = [pool.submit(check_files, path, manifest, [name]) for name in names]
        for future in concurrent.futures.as_completed(futures):
            m, p = future.result()
            missing += m
            problems += p
            done += 1
            if sys.stderr.isatty():
                print(f"\r  {path.name}: {done}/{len(names)} files", end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for name in missing:
        print(f"MISSING {path / name} (deleted for a partial resume?)")
    for problem in problems:
        print(f"BAD  {problem}")
    if not problems:
        size = sum(f.size for f in manifest.files.values())
        print(f"OK   {path}: {len(names) - len(missing)} files, {_human(size)}, {time.monotonic() - started:.2f}s")
    return 1 if problems else 0


def cmd_clean(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise CheckpointError(f"no such directory: {args.dir}")
    if args.keep is not None and args.keep < 1:
        raise CheckpointError("--keep must be at least 1 (the newest checkpoint is never deleted)")
    doomed = select_for_deletion([s for s, _ in list_committed(args.dir)], args.keep)
    leftovers = list_leftovers(args.dir)
    verb = "would remove" if args.dry_run else "removed"
    if not args.dry_run:
        clean_leftovers(args.dir)
        for step in doomed:
            delete_checkpoint(args.dir, step)
    for left in leftovers:
        print(f"{verb} {left.path} ({left.kind})")
    for step in doomed:
        print(f"{verb} {args.dir / f'checkpoint-{step}'}")
    if not leftovers and not doomed:
        print("nothing to remove")
    return 0


def _table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [tuple(header), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _age(path: Path) -> str:
    seconds = max(0.0, time.time() - path.stat().st_mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__":
    sys.exit(main())
