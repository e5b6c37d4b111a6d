"""Which committed checkpoints to keep, deleting the others, and start-up cleanup.

``select_for_deletion`` is pure. The deleting functions run on rank 0 only: retention on the
background commit thread right after a commit, cleanup on the training thread at manager start.
A checkpoint is always moved out of its ``checkpoint-N`` name (one rename, then a directory
fsync) before its files are deleted, so a crash mid-delete never leaves a partial checkpoint
under a committed name (invariant 3).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from . import faults
from .layout import checkpoint_dirname, list_committed, list_leftovers, trash_dirname
from .storage import fsync_dir, remove_tree

logger = logging.getLogger(__name__)


def select_for_deletion(steps: Iterable[int], limit: int | None, protected: Iterable[int] = ()) -> list[int]:
    """Steps to delete so that at most ``limit`` committed checkpoints remain (pure).

    Oldest first. The newest step and every ``protected`` step (e.g. the best one) are never
    selected; they count toward the limit, so more than ``limit`` may remain when many are
    protected. ``limit=None`` keeps everything.
    """
    ordered = sorted(set(steps))
    if limit is None or len(ordered) <= limit:
        return []
    if limit < 1:
        raise ValueError(f"save_total_limit must be at least 1, got {limit}")
    keep = {ordered[-1], *protected}
    excess = len(ordered) - limit
    return [step for step in ordered if step not in keep][:excess]


def delete_checkpoint(output_dir: Path, step: int) -> None:
    """Remove committed ``checkpoint-<step>``: rename it to a trash name, fsync, then delete."""
    source = Path(output_dir) / checkpoint_dirname(step)
    trash = Path(output_dir) / trash_dirname(step, uuid.uuid4().hex[:12], "deleting")
    os.rename(source, trash)
    fsync_dir(Path(output_dir))
    faults.hit("mid_delete", 0)
    remove_tree(trash)


def apply_retention(output_dir: Path, limit: int | None, protected: Iterable[int] = ()) -> list[int]:
    """Delete the committed checkpoints ``select_for_deletion`` picks; return their steps."""
    steps = [step for step, _ in list_committed(output_dir)]
    doomed = select_for_deletion(steps, limit, protected)
    for step in doomed:
        delete_checkpoint(output_dir, step)
        logger.info("retention: deleted checkpoint-%d (limit %s)", step, limit)
        faults.hit("after_delete", 0)
    return doomed


def clean_leftovers(output_dir: Path, keep_token: str | None = None) -> list[Path]:
    """Remove what interrupted saves and deletions left behind; return what was removed.

    A ``replaced`` directory whose ``checkpoint-N`` is missing (a crash between the two renames
    of a re-save) is renamed back to ``checkpoint-N`` instead: it was complete. Directories whose
    token is ``keep_token`` belong to the running job and are left alone.
    """
    removed = []
    root = Path(output_dir)
    for left in list_leftovers(root):
        if keep_token is not None and left.token.startswith(keep_token):
            continue
        final = root / checkpoint_dirname(left.step)
        if left.kind == "replaced" and not final.exists():
            os.rename(left.path, final)
            fsync_dir(root)
            logger.warning("recovered %s from an interrupted re-save of step %d", final, left.step)
            continue
        remove_tree(left.path)
        removed.append(left.path)
        logger.info("removed leftover %s", left.path)
    return removed
