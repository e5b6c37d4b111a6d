"""``async-ckpt bench``: find the benchmarks in ``perf/`` of a source checkout and run one.

Benchmarks are found with ``ast`` (nothing is imported to list them) and run with ``runpy`` in
this process.
"""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path

from .common import CliError, table

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
    candidates = [given] if given is not None else [Path.cwd() / "perf", Path(__file__).resolve().parents[3] / "perf"]
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
        table(["name", "what it measures"], sorted(available.items()))
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
