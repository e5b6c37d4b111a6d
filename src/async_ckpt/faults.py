"""Named fault points inside the save pipeline, for tests that prove crash safety.

Production code calls ``hit(point, rank)`` at each phase boundary; it does nothing unless a
fault is armed, either in-process with ``arm()`` or for a child process through the environment
variable ``ASYNC_CKPT_FAULTS="point:action[:rank][,...]"``. Actions: ``raise`` (an ``OSError``),
``enospc`` (an ``OSError`` with ``errno.ENOSPC``, as a full disk gives), ``kill`` (SIGKILL this
process), ``stall`` (sleep ``ASYNC_CKPT_STALL_S`` seconds, default one hour).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from typing import Any

POINTS = (
    "after_snapshot",  # training thread, once the copy is taken
    "mid_write",  # I/O thread, after the first write to a file (small writes may still be gathered in memory)
    "before_fsync",  # I/O thread, file written, not yet durable
    "before_rename",  # I/O thread, file durable under its temporary name
    "before_report",  # commit thread, all files written, before telling rank 0
    "before_manifest",  # rank 0 commit thread, every report in
    "before_publish",  # rank 0 (rundir.publish), manifest durable, staging not yet renamed
    "before_retention",  # rank 0, committed, before old checkpoints are deleted
    "mid_delete",  # rank 0 (rundir.delete), a checkpoint renamed out of its name, its files not yet deleted
    "after_delete",  # rank 0, one checkpoint deleted, the next not yet
    # the run directory's protocol (rundir.py); its docstring says what a crash at each leaves
    "after_stage",  # every rank's commit thread, staging directory created, nothing written in it
    "mid_replace",  # rank 0, a re-save: the old checkpoint-N renamed aside, the new one not yet renamed
    "after_publish",  # rank 0, staging renamed to checkpoint-N and the parent fsynced; replaced one not yet removed
    "mid_recover",  # rank 0's training thread at start-up, one leftover restored or removed, the next not yet
)
ACTIONS = ("raise", "enospc", "kill", "stall")
ENV = "ASYNC_CKPT_FAULTS"
STALL_ENV = "ASYNC_CKPT_STALL_S"
_armed: dict[str, tuple[Any, int | None]] = {}


def arm(point: str, action: str | Callable[[str, int], None] = "raise", rank: int | None = None) -> None:
    """Arm ``point`` in this process (tests only). ``action`` may also be a callback(point, rank)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if not callable(action) and action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; known: {', '.join(ACTIONS)}")
    _armed[point] = (action, rank)


def disarm() -> None:
    _armed.clear()


def hit(point: str, rank: int) -> None:
    """Fire the fault armed at ``point`` for ``rank``, if any. Any thread may call it."""
    armed = _armed.get(point) or _from_env(point)
    if armed is None:
        return
    action, only_rank = armed
    if only_rank is not None and only_rank != rank:
        return
    if callable(action):
        action(point, rank)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        time.sleep(float(os.environ.get(STALL_ENV, "3600")))
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point} on rank {rank})")
    else:
        raise OSError(f"injected fault at {point} on rank {rank}")


def _from_env(point: str) -> tuple[str, int | None] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        if parts[0] == point:
            action = parts[1] if len(parts) > 1 else "raise"
            return action, int(parts[2]) if len(parts) > 2 and parts[2] != "" else None
    return None
