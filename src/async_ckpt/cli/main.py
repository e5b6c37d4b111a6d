"""The ``async-ckpt`` argument parser, logging setup and dispatch (``main``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .bench import cmd_bench
from .common import CliError
from .ctl import cmd_ctl
from .export import cmd_export
from .state import RECENT_S, cmd_clean, cmd_inspect, cmd_list, cmd_verify

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
    from .. import __version__

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
    package = logging.getLogger(__name__.split(".")[0])  # "async_ckpt": every module's logger is below it
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("async-ckpt: %(levelname)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO if verbose else logging.WARNING)
