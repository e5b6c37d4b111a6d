"""Named fault points inside the save pipeline, for tests that prove crash safety.

Production code calls ``hit(point, rank)`` at each phase boundary; it does nothing unless a
fault is armed, either in-process with ``arm()`` or for a child process through the environment
variable ``ASYNC_CKPT_FAULTS="point:action[:rank][,...]"``. Actions: ``raise`` (an ``OSError``),
``kill`` (SIGKILL this process), ``stall`` (sleep for an hour).
"""

from __future__ import annotations

import os
import signal
import time

POINTS = (
    "after_snapshot",  # training thread, once the copy is taken
    "mid_write",  # I/O thread, after the first bytes of a file
    "before_fsync",  # I/O thread, file written, not yet durable
    "before_rename",  # I/O thread, file durable under its temporary name
    "before_report",  # commit thread, all files written, before telling rank 0
    "before_manifest",  # rank 0 commit thread, every report in
    "before_publish",  # rank 0, manifest durable, staging not yet renamed
    "before_retention",  # rank 0, committed, before old checkpoints are deleted
)
ENV = "ASYNC_CKPT_FAULTS"
_armed: dict[str, tuple[str, int | None]] = {}


def arm(point: str, action: str = "raise", rank: int | None = None) -> None:
    """Arm ``point`` in this process (tests only)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
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
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        time.sleep(3600)
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
