"""``async-ckpt export``: one plain ``model.safetensors`` from a checkpoint (over ``export.export_model``)."""

from __future__ import annotations

import argparse

from ..export import export_model
from .common import human


def cmd_export(args: argparse.Namespace) -> int:
    result = export_model(args.checkpoint, args.out, component=args.component, duplicate_tied=args.duplicate_tied, force=args.force)
    count, aliases = result.tensors, result.aliases
    tied = f"; {len(aliases)} tied name(s) " + ("duplicated" if args.duplicate_tied else "stored once, aliases in the metadata") if aliases else ""
    print(f"wrote {result.path}: {count} tensor{'s' if count != 1 else ''}, {human(result.path.stat().st_size)}, "
          f"from {len(result.sources)} file(s) of step {result.step}{tied}")
    return 0
