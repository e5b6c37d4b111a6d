"""Which committed checkpoints to keep, and deleting the others through the run-directory module.

``select_for_deletion`` is pure. ``apply_retention`` runs on rank 0's background commit thread
right after a commit, while this job owns the directory; every rename and delete goes through
``rundir.delete`` (renamed out of its ``checkpoint-N`` name first, so a crash mid-delete never
leaves a partial checkpoint under a committed name: invariant 3). A deletion that fails is
logged as a failure with its reason and retried at the next retention and at the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from . import faults, rundir
from .layout import list_committed

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


def apply_retention(output_dir: Path, limit: int | None, protected: Iterable[int] = ()) -> list[int]:
    """Delete the committed checkpoints ``select_for_deletion`` picks; return the steps fully deleted.

    Rank 0's commit thread. First retries the trash of earlier removals that failed. A checkpoint
    whose files cannot all be removed is logged at ERROR with the reason; it no longer counts as
    committed (it was renamed first) and its trash is retried next time.
    """
    if limit is None:
        return []
    rundir.retry_trash(Path(output_dir))
    steps = [step for step, _ in list_committed(output_dir)]
    deleted = []
    for step in select_for_deletion(steps, limit, protected):
        try:
            rundir.delete(Path(output_dir), step)
        except OSError as exc:
            logger.error("[rank 0] retention: could not delete checkpoint-%d (limit %s): %s; what is left is retried at the "
                         "next retention or start", step, limit, exc)
        else:
            deleted.append(step)
            logger.info("[rank 0] retention: deleted checkpoint-%d (limit %s)", step, limit)
        faults.hit("after_delete", 0)
    return deleted
