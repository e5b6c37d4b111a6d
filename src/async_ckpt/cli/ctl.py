"""``async-ckpt ctl``: leave a save / save-and-stop / stop request for a running trainer.

The request is a file in the trainer's output directory that rank 0 takes at a step boundary
(docs/stopping.md).
"""

from __future__ import annotations

import argparse
import time

from .common import CliError


def cmd_ctl(args: argparse.Namespace) -> int:
    from ..trainer.control import write_command  # the trainer layer, imported by this command only

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
