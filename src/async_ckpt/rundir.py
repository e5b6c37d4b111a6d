"""The run directory's protocol: every rename, fsync and delete of directories under ``output_dir``.

Nothing else in async_ckpt renames or deletes under ``output_dir`` (file writes inside a
staging directory are ``storage.write_file``'s; the lock file is ``ownership``'s). Every
function here is synchronous, blocks only on the disk, and talks to no other rank: no
collective, no Store (invariant 5). The writing ones are called only by the job that owns the
directory (``ownership``), and those that touch a committed name only by its rank 0, one call at
a time (the commit thread and the training thread of rank 0 never run them at once: the
training thread calls them at construction, before the first save, or after ``wait()``).

==================  ==========================================  ==============================
call                who, on which thread                        what it does on disk
==================  ==========================================  ==============================
``stage``           every rank's commit thread, before writing  mkdir the staging directory
``publish``         rank 0's commit thread, manifest durable    fsync staging; [old ->
                                                                ``.replaced-<t>``]; staging ->
                                                                ``checkpoint-N``; fsync parent;
                                                                remove ``.replaced-<t>``
``discard``         rank 0's commit thread, save failed         remove the staging directory
``delete``          rank 0: retention (commit thread),          ``checkpoint-N`` ->
                    ``overwrite_output_dir`` (training thread),  ``.deleting-<t>``; fsync
                    ``async-ckpt clean --keep``                 parent; remove the trash
``retry_trash``     rank 0's commit thread, before retention    remove trash a failed removal
                                                                left
``recover``         rank 0's training thread at construction,   restore or remove every
                    owning the directory; ``async-ckpt clean``  leftover of a dead job
==================  ==========================================  ==============================

What a crash leaves at each step (its fault point in brackets) and what the next owner's
``recover`` does with it. Resume never reads a hidden name, so it always sees the last
committed state:

- ``[after_stage]``, or any time while files are written: a partial staging directory.
  Removed. Resume picks the previous checkpoint.
- ``[before_publish]``: a complete staging directory, manifest included, not renamed. Removed:
  it never committed.
- ``[mid_replace]`` (step N saved again): the old ``checkpoint-N`` under ``.replaced-<t>``, the
  new one complete in staging, no ``checkpoint-N``. The old one is renamed back, the staging
  directory removed: the re-save did not commit, and ``checkpoint-N`` is again the old one.
- ``[after_publish]``: ``checkpoint-N`` committed; the parent may not be fsynced and a
  ``.replaced-<t>`` may remain. The trash is removed. (A power loss before the parent's fsync
  can undo the rename: the state is then that of ``before_publish`` or ``mid_replace``.)
- ``[mid_delete]``: ``.deleting-<t>`` with some of a deleted checkpoint's files. Removed.
- ``[mid_recover]``: some leftovers handled, others not. The next start handles the rest.

A removal that fails (a file that cannot be unlinked) raises ``OSError`` naming what stayed,
never passes silently; its trash keeps a hidden name, so it is retried by ``retry_trash`` at the
next retention and by ``recover`` at the next start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import faults
from .errors import CheckpointDirectoryError, CheckpointSpaceError
from .layout import MANIFEST_NAME, Leftover, checkpoint_dirname, list_committed, list_leftovers, parse_step, trash_dirname

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a directory tree that is no longer under a committed name, or raise ``OSError``.

    Tries every entry, then raises one ``OSError`` (the first failure's errno) naming what could
    not be removed. A tree that is already gone is not an error.
    """
    failures: list[OSError] = []

    def note(_func: object, _failed: str, exc_info: tuple) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            failures.append(exc_info[1])

    shutil.rmtree(path, onerror=note)
    if failures:
        first = failures[0]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise OSError(first.errno or errno.EIO, f"could not remove {path}: {first.filename}: {first.strerror or first}{more}")


def _trash(output_dir: Path, step: int, kind: str) -> Path:
    return output_dir / trash_dirname(step, uuid.uuid4().hex[:12], kind)


def stage(staging: Path, rank: int) -> None:
    """Create ``staging`` (every rank of a save may: the first one creates it). Commit thread.

    The run directory itself must exist (construction made it): a run directory deleted under a
    running job fails the save here rather than being recreated without an owner.
    """
    try:
        os.mkdir(staging)
    except FileExistsError:
        if not staging.is_dir() or staging.is_symlink():
            raise
    faults.hit("after_stage", rank)


def publish(staging: Path, final: Path) -> None:
    """Give a complete staging directory its committed name. Rank 0's commit thread.

    Called after the manifest is durable in ``staging``. If ``final`` exists (step N saved again
    after a rewind) it is first renamed to a ``.replaced-<t>`` name, so there is never a moment
    with a partial directory under the committed name; if the second rename fails the old one is
    renamed back. The replaced directory is removed last; a failure there is logged (the save has
    committed) and retried at the next retention or start. Raises ``OSError`` when not committed.
    """
    faults.hit("before_publish", 0)
    fsync_dir(staging)
    replaced = None
    if final.exists():
        replaced = _trash(final.parent, parse_step(final.name) or 0, "replaced")
        os.rename(final, replaced)
        faults.hit("mid_replace", 0)
    try:
        os.rename(staging, final)
    except OSError:
        if replaced is not None:
            os.rename(replaced, final)
        raise
    fsync_dir(final.parent)
    faults.hit("after_publish", 0)
    if replaced is not None:
        try:
            remove_tree(replaced)
        except OSError as exc:
            logger.error("[rank 0] %s committed, but the checkpoint it replaced stays on disk: %s; removal is retried "
                         "at the next retention or start", final, exc)


def discard(staging: Path) -> None:
    """Remove the staging directory of a save that failed. Rank 0's commit thread; never raises.

    What cannot be removed is logged and stays under its hidden name: the next start removes it.
    """
    try:
        remove_tree(staging)
    except OSError as exc:
        logger.warning("[rank 0] the staging directory of a failed save stays on disk (removed at the next start): %s", exc)


def delete(output_dir: Path, step: int) -> None:
    """Remove committed ``checkpoint-<step>``: rename it to a trash name, fsync the parent, delete.

    Rank 0 only (see the module's table). Raises ``FileNotFoundError`` when there is no such
    checkpoint, and ``OSError`` when its files could not all be removed: it is then no longer
    committed (the rename came first) and its trash is retried later.
    """
    output_dir = Path(output_dir)
    trash = _trash(output_dir, step, "deleting")
    os.rename(output_dir / checkpoint_dirname(step), trash)
    fsync_dir(output_dir)
    faults.hit("mid_delete", 0)
    remove_tree(trash)


def retry_trash(output_dir: Path) -> list[Path]:
    """Remove what earlier removals left (``deleting``, and ``replaced`` beside its checkpoint).

    Rank 0's commit thread, before retention, while this job owns the directory: no other job's
    directories can be there. Staging directories are never touched (they may be this job's).
    Returns what is gone now; what still fails is logged.
    """
    removed = []
    for left in list_leftovers(output_dir):
        replaced_done = left.kind == "replaced" and (Path(output_dir) / checkpoint_dirname(left.step)).exists()
        if left.kind == "deleting" or replaced_done:
            try:
                remove_tree(left.path)
            except OSError as exc:
                logger.error("[rank 0] still cannot remove %s: %s", left.path, exc)
                continue
            removed.append(left.path)
            logger.info("[rank 0] removed %s, left by an earlier removal that failed", left.path.name)
    return removed


@dataclass(frozen=True)
class Repair:
    """What recovery does with one leftover: ``restore`` it as ``checkpoint-N``, or ``remove`` it."""

    leftover: Leftover
    action: str  # "restore" | "remove"
    target: Path  # the restored name, or the leftover itself


def plan_recovery(output_dir: Path) -> list[Repair]:
    """What ``recover`` would do, from the names on disk (read only).

    A ``replaced`` directory whose ``checkpoint-N`` is missing is restored: a crash came between
    the two renames of a re-save, and it is the last committed ``checkpoint-N``. At most one
    is restored per step. Everything else hidden is removed.
    """
    root = Path(output_dir)
    repairs, restoring = [], set()
    for left in list_leftovers(root):
        final = root / checkpoint_dirname(left.step)
        if left.kind == "replaced" and not final.exists() and left.step not in restoring:
            restoring.add(left.step)
            repairs.append(Repair(left, "restore", final))
        else:
            repairs.append(Repair(left, "remove", left.path))
    return repairs


def repair(item: Repair) -> None:
    """Carry out one ``Repair``; raises ``OSError`` when it could not (rank 0 / the CLI, owning)."""
    if item.action == "restore":
        os.rename(item.leftover.path, item.target)
        fsync_dir(item.target.parent)
    else:
        remove_tree(item.leftover.path)


def recover(output_dir: Path, keep_token: str | None = None) -> list[Path]:
    """Start-up recovery: restore interrupted re-saves, remove every other leftover.

    Rank 0's training thread at construction, once this job owns the directory, so every
    leftover is a dead job's. Leftovers whose token starts with ``keep_token`` are skipped.
    Returns the paths removed; a failure is logged and left for the next start.
    """
    removed = []
    for item in plan_recovery(output_dir):
        if keep_token is not None and item.leftover.token.startswith(keep_token):
            continue
        try:
            repair(item)
        except OSError as exc:
            logger.error("[rank 0] could not %s leftover %s: %s", item.action, item.leftover.path, exc)
            continue
        if item.action == "restore":
            logger.warning("[rank 0] restored %s from an interrupted re-save of step %d", item.target, item.leftover.step)
        else:
            removed.append(item.leftover.path)
            logger.info("[rank 0] removed leftover %s", item.leftover.path)
        faults.hit("mid_recover", 0)
    return removed


def delete_all(output_dir: Path) -> list[int]:
    """Delete every committed checkpoint (``overwrite_output_dir``). Rank 0's training thread.

    Returns the steps deleted; raises ``OSError`` on the first one that could not be removed.
    """
    steps = [step for step, _ in list_committed(output_dir)]
    for step in steps:
        delete(Path(output_dir), step)
    return steps


# --------------------------------------------------------------------------- the directory itself

SPACE_FACTOR = 0.9  # a save is refused when the free space is below this share of the last checkpoint


def make_run_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and its parents) or raise ``CheckpointDirectoryError`` saying why.

    Rank 0's training thread at construction, before ``ownership.acquire`` writes the lock file.
    """
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else (exc.strerror or str(exc))
        raise CheckpointDirectoryError(f"Cannot create the run directory {output_dir}: {reason} ({type(exc).__name__}); "
                                       "choose an output_dir on a writable file system") from None


def check_writable(output_dir: Path, rank: int) -> CheckpointDirectoryError | None:
    """This rank's verdict on writing under ``output_dir`` (after rank 0 made it). Training thread."""
    if os.access(output_dir, os.W_OK | os.X_OK):
        return None
    return CheckpointDirectoryError(f"[rank {rank}] Cannot write to the run directory {output_dir} from this rank "
                                    "(read-only, or no permission); every rank writes its files there")


def checkpoint_size(path: Path) -> int:
    """Bytes of a committed checkpoint, from its manifest; 0 when the manifest does not read."""
    try:
        files = json.loads((Path(path) / MANIFEST_NAME).read_text()).get("files", {})
        return int(sum(int(f.get("size", 0)) for f in files.values()))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def report_space(output_dir: Path) -> int:
    """Log the free space at start (INFO; WARNING when the next save would be refused); return the
    newest committed checkpoint's size. Rank 0's training thread at construction."""
    committed = list_committed(output_dir)
    last = checkpoint_size(committed[-1][1]) if committed else 0
    usage = shutil.disk_usage(output_dir)
    level = logging.WARNING if last and usage.free < SPACE_FACTOR * last else logging.INFO
    logger.log(level, "[rank 0] %s: %.2f GiB free of %.2f GiB%s", output_dir, usage.free / 2**30, usage.total / 2**30,
               f"; the newest checkpoint takes {last / 2**30:.2f} GiB" if last else "")
    return last


def check_space(output_dir: Path, needed: int, rank: int, step: int) -> None:
    """Refuse a save before anything is written when the free space is clearly below ``needed``.

    Every rank's commit thread, before ``stage``. ``needed``: the last committed checkpoint's
    bytes (0: nothing to compare with, never refused). Raises ``CheckpointSpaceError``.
    """
    if needed <= 0:
        return
    free = shutil.disk_usage(output_dir).free
    if free < SPACE_FACTOR * needed:
        raise CheckpointSpaceError(
            f"[rank {rank} step {step} phase write] not enough free space under {output_dir}: {free} bytes free, the last "
            f"checkpoint took {needed}; nothing was written. Free space (or lower save_total_limit) and save again"
        )
