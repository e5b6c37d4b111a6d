"""The ``async-ckpt`` command: list, inspect, verify, clean, export and bench.

Each subcommand is a ``cmd_<name>(args) -> int`` run by ``main`` in the calling process; none of
them takes part in a training job. ``list``, ``inspect`` and ``verify`` only read; ``clean``
renames and deletes the way the manager's start-up cleanup and retention do; ``export`` writes
one new file. Exit codes: 0 success; 1 a damaged checkpoint or an expected error (one message on
stderr, no traceback); 2 bad usage (argparse); 130 interrupted.
``ctl`` leaves a request for a running trainer in its output directory (docs/stopping.md).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import logging
import os
import runpy
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .export import export_model
from .layout import MANIFEST_NAME, checkpoint_dirname, list_committed, list_leftovers, parse_step
from .manifest import Manifest, check_files, read_manifest
from .retention import delete_checkpoint, select_for_deletion
from .storage import fsync_dir, remove_tree

logger = logging.getLogger(__name__)

RECENT_S = 600.0  # clean keeps leftovers touched this recently unless --force: a save may own them


class CliError(Exception):
    """An expected failure of a subcommand: its message goes to stderr and the exit code is 1."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``async-ckpt`` and ``python -m async_ckpt.cli``; returns the exit code."""
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except BrokenPipeError:  # `async-ckpt list runs | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CheckpointError, CliError, OSError) as exc:
        print(f"async-ckpt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="async-ckpt", description="Inspect and maintain async_ckpt checkpoints.",
                                     epilog="Exit codes: 0 ok, 1 damaged checkpoint or error, 2 bad usage.")
    parser.add_argument("--version", action="version", version=f"async-ckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="verify: a line per good file; log async_ckpt's INFO messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubParser)

    p = sub.add_parser("list", help="checkpoints of a run directory and the one resume would pick",
                       description="List committed checkpoints and leftovers. Checks manifests and file sizes only; "
                       "`verify` also checks hashes.")
    p.add_argument("dir", type=Path, help="a run directory (TrainingArguments.output_dir)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inspect", help="a checkpoint's manifest as tables", description="Show a checkpoint's manifest.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (checkpoint-N)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check the size and xxh3 of every file",
                       description="Check the size and xxh3 of every file of a checkpoint, or of every committed "
                       "checkpoint of a run directory. Exit code 0 only when every checkpoint is good.")
    p.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    p.add_argument("--threads", type=int, default=4, help="files read in parallel (default 4)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("clean", help="remove leftovers of interrupted saves and, with --keep, old checkpoints",
                       description="Remove staging and trash directories left by interrupted saves and, with --keep N, "
                       "all but the newest N committed checkpoints. The newest checkpoint and the one resume would "
                       f"pick are never removed. Leftovers touched in the last {RECENT_S:.0f} s are kept unless --force.")
    p.add_argument("dir", type=Path, help="a run directory")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="keep the newest N committed checkpoints")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.add_argument("--force", action="store_true", help="also remove leftovers a running save may still be writing")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("export", help="write the model as one plain model.safetensors",
                       description="Merge a component's files (pipeline stages, compressed or not) into one "
                       "safetensors file that safetensors.torch.load_file and Hugging Face loaders read.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (checkpoint-N)")
    p.add_argument("out", type=Path, help="output directory (model.safetensors goes inside) or a .safetensors path")
    p.add_argument("--component", default="model", help="component to export (default: model)")
    p.add_argument("--duplicate-tied", action="store_true",
                   help="write every name of a tied weight as its own copy instead of one copy plus an alias in the metadata")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run a benchmark from the perf/ folder of a source checkout",
                       description="Without NAME: list the benchmarks. With NAME: run perf/NAME.py with ARGS "
                       "(`async-ckpt bench stall --help` shows its options).")
    p.add_argument("name", nargs="?", help="benchmark name, e.g. stall")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the benchmark")
    p.add_argument("--perf-dir", type=Path, default=None, help="where the benchmarks are (default: ./perf, else the source checkout's)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ctl", help="ask a running trainer to save now, save and stop, or stop",
                       description="Write DIR/async_ckpt.control. Rank 0 of the trainer whose output_dir is DIR takes it "
                       "at a step boundary (every control_poll_s seconds) and every rank acts on it at the same step.")
    p.add_argument("dir", type=Path, help="the run directory (TrainingArguments.output_dir)")
    p.add_argument("command", choices=["save", "save-and-stop", "stop"], help="what the trainer should do")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait until the trainer has taken the request (exit code 1 if not)")
    p.set_defaults(func=cmd_ctl)
    return parser


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser; takes the options every subcommand shares (``-v``)."""

    def __init__(self, **kwargs: Any) -> None:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="verify: a line per good file; log async_ckpt's INFO messages on stderr")
        super().__init__(parents=[common], **kwargs)


def _setup_logging(verbose: bool) -> None:
    """Send async_ckpt's log records to stderr, unless the caller's program configured logging."""
    if logging.getLogger().handlers or logger.parent.handlers:  # type: ignore[union-attr]
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("async-ckpt: %(levelname)s %(message)s"))
    package = logging.getLogger("async_ckpt")
    package.addHandler(handler)
    package.setLevel(logging.INFO if verbose else logging.WARNING)


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
    rows = [(e["name"], str(e["step"]), e["state"], _human(e["size_bytes"]), _age(e["mtime"]),
             "" if e["world_size"] is None else str(e["world_size"]), _mark(e["resume"], e["note"])) for e in entries]
    _table(["name", "step", "state", "size", "age", "world", ""], rows)
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
        print(json.dumps(asdict(manifest), indent=2))
        return 0
    total = sum(f.size for f in manifest.files.values())
    print(f"{path}: step {manifest.step}, world size {manifest.world_size}, {len(manifest.files)} files, {_human(total)}")
    print(f"written {manifest.timestamp or '?'} by torch {manifest.pytorch_version or '?'}, format {manifest.format_version}")
    if path.name.startswith(".checkpoint-"):
        print("note: this is a leftover of an interrupted save, not a committed checkpoint")
    print()
    rows = [(c.key, c.sharing_pattern + (f"({c.group})" if c.group else ""), _ranks(c.ranks), _human(c.size_bytes),
             "yes" if c.required else "no", c.file_format) for c in manifest.components.values()]
    _table(["component", "pattern", "ranks", "size", "required", "format"], rows)
    print()
    rows = [(name, f.component, f.slot, _human(f.size), f.codec or "-", f.xxh3) for name, f in manifest.files.items()]
    _table(["file", "component", "slot", "size", "codec", "xxh3"], rows)
    if manifest.timings:
        print()
        phases = sorted({p for t in manifest.timings.values() for p in t})
        rows = [(rank, *(f"{1000 * t[p]:.1f}" if p in t else "-" for p in phases))
                for rank, t in sorted(manifest.timings.items(), key=lambda kv: int(kv[0]))]
        _table(["rank", *(p.removesuffix("_s") + " ms" for p in phases)], rows)
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
                print(f"\r  {path.name}: {count}/{len(names)} files, {_human(done_bytes)} of {_human(total)}   ", end="", file=sys.stderr, flush=True)
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
            print(f"ok   {path / name}: {_human(manifest.files[name].size)}, xxh3 {manifest.files[name].xxh3}")
    for name in sorted(bad):
        print(f"BAD  {bad[name]}")
    if bad:
        print(f"BAD  {path}: {len(bad)} of {len(names)} files damaged")
        return False
    partial = f" ({len(missing)} optional missing)" if missing else ""
    present = total - sum(manifest.files[name].size for name in missing)
    print(f"OK   {path}: {len(names) - len(missing)} files{partial}, {_human(present)}, {time.monotonic() - started:.2f} s")
    return True


# -------------------------------------------------------------------------------------- clean


def cmd_clean(args: argparse.Namespace) -> int:
    root = _run_dir(args.dir)
    if args.keep is not None and args.keep < 1:
        raise CliError("--keep must be at least 1 (the newest checkpoint is never removed)")
    verb = "would remove" if args.dry_run else "removed"
    acted = False
    for left in list_leftovers(root):
        final = root / checkpoint_dirname(left.step)
        idle = time.time() - _last_touched(left.path)
        if idle < RECENT_S and not args.force:
            print(f"kept {left.path} ({left.kind}, touched {idle:.0f} s ago: a save may still be running; --force removes it)")
            continue
        acted = True
        if left.kind == "replaced" and not final.exists():  # a re-save crashed between its two renames
            if not args.dry_run:
                os.rename(left.path, final)
                fsync_dir(root)
            print(f"{'would restore' if args.dry_run else 'restored'} {final} (from {left.path.name}, an interrupted re-save)")
            continue
        if not args.dry_run:
            remove_tree(left.path)
        print(f"{verb} {left.path} ({left.kind} leftover)")
    if args.keep is not None:
        committed = list_committed(root)
        resume = next((step for step, path in reversed(committed) if checkpoint_state(path)[0] != "damaged"), None)
        for step in select_for_deletion([s for s, _ in committed], args.keep, protected=[] if resume is None else [resume]):
            acted = True
            if not args.dry_run:
                try:
                    delete_checkpoint(root, step)
                except FileNotFoundError:  # retention of a running job got there first
                    continue
            print(f"{verb} {root / checkpoint_dirname(step)}")
    if not acted:
        print("nothing to remove")
    return 0


def _last_touched(path: Path) -> float:
    """The newest mtime of a directory and its direct entries (a save in progress touches them)."""
    times = [path.lstat().st_mtime]
    for entry in path.iterdir():
        try:
            times.append(entry.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


# ------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    result = export_model(args.checkpoint, args.out, component=args.component, duplicate_tied=args.duplicate_tied, force=args.force)
    count, aliases = result.tensors, result.aliases
    tied = f"; {len(aliases)} tied name(s) " + ("duplicated" if args.duplicate_tied else "stored once, aliases in the metadata") if aliases else ""
    print(f"wrote {result.path}: {count} tensor{'s' if count != 1 else ''}, {_human(result.path.stat().st_size)}, "
          f"from {len(result.sources)} file(s) of step {result.step}{tied}")
    return 0


# -------------------------------------------------------------------------------------- bench


def find_benchmarks(perf_dir: Path) -> dict[str, str]:
    """``{name: first docstring line}`` of the modules in ``perf_dir`` that define ``main``.

    Read with ``ast``, without importing anything.
    """
    found = {}
    for file in sorted(perf_dir.glob("*.py")):
        if file.name.startswith("_"):
            continue
        try:
            tree = ast.parse(file.read_text(), str(file))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found[file.stem] = (ast.get_docstring(tree) or "").strip().split("\n")[0]
    return found


def _perf_dir(given: Path | None) -> Path:
    candidates = [given] if given is not None else [Path.cwd() / "perf", Path(__file__).resolve().parents[2] / "perf"]
    for candidate in candidates:
        if (candidate / "__init__.py").is_file():
            return candidate.resolve()
    raise CliError(f"no benchmarks at {candidates[0]}: they live in perf/ of a source checkout; "
                   "run from the repository root or pass --perf-dir")


def cmd_bench(args: argparse.Namespace) -> int:
    perf_dir = _perf_dir(args.perf_dir)
    available = find_benchmarks(perf_dir)
    if not args.name:
        print(f"benchmarks in {perf_dir} (run: async-ckpt bench NAME [ARGS], NAME --help for options):")
        _table(["name", "what it measures"], sorted(available.items()))
        return 0
    if args.name not in available:
        raise CliError(f"no benchmark named {args.name!r}; available: {', '.join(available) or 'none'}")
    sys.path.insert(0, str(perf_dir.parent))
    saved_argv = sys.argv
    sys.argv = [f"async-ckpt bench {args.name}", *args.bench_args]
    try:
        runpy.run_module(f"{perf_dir.name}.{args.name}", run_name="__main__", alter_sys=False)
    except SystemExit as exc:  # argparse in the benchmark: --help, bad options
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        sys.path.remove(str(perf_dir.parent))
    return 0


# ---------------------------------------------------------------------------------------- ctl


def cmd_ctl(args: argparse.Namespace) -> int:
    from .trainer.control import write_command  # the trainer layer, imported by this command only

    if not args.dir.is_dir():
        raise CliError(f"{args.dir} is not a directory: give the trainer's output_dir")
    path = write_command(args.dir, args.command)
    print(f"requested {args.command}: {path} (rank 0 takes it at the next step boundary)")
    if args.wait is None:
        return 0
    deadline = time.monotonic() + args.wait
    while path.exists():
        if time.monotonic() > deadline:
            raise CliError(f"{path} not taken after {args.wait:g} s: is a trainer running with output_dir={args.dir}?")
        time.sleep(0.05)
    print("taken")
    return 0


# ------------------------------------------------------------------------------------ helpers


def _run_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CliError(f"no such directory: {path}")
    if (path / MANIFEST_NAME).exists():
        raise CliError(f"{path} is a checkpoint, not a run directory; pass its parent {path.parent}")
    return path


def _table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [tuple(header), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(mtime: float) -> str:
    seconds = max(0.0, time.time() - mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__":
    sys.exit(main())
