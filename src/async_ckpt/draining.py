"""Draining saves in flight when a manager closes or the interpreter exits, and saying how each ended.

``drain_at_exit`` is called once per manager at construction (training thread); the hook it
registers runs on the main thread at interpreter exit, before ``concurrent.futures`` joins the
manager's pool threads, so the wait can be bounded and logged.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.thread  # noqa: F401 - registers its exit hook (joining the pool threads) before ours
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from .handle import SaveHandle

logger = logging.getLogger(__name__)

_OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()  # managers not closed yet, drained at exit
_exit_hook_registered = False


def drain_at_exit(manager: Any) -> None:
    """Have interpreter exit drain ``manager`` unless it is closed first (one hook for all).

    ``threading._register_atexit`` runs hooks before the pool threads are joined (``atexit`` runs
    them after): only there can the wait be bounded and logged. Holds managers weakly.
    """
    global _exit_hook_registered
    _OPEN.add(manager)
    if _exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(_drain_open_managers)
    except RuntimeError:  # the interpreter is already shutting down
        return
    _exit_hook_registered = True


def _drain_open_managers() -> None:
    for manager in list(_OPEN):
        try:
            exit_drain(manager)
        except Exception:  # an exit hook must not stop the others
            logger.exception("draining a CheckpointManager at exit failed")


def log_drained(rank: int, when: str, handles: list[SaveHandle], waited_s: float) -> None:
    """Log how each save ``close`` or exit waited for ended: committed, failed or still running."""
    for handle in handles:
        if not handle.done():
            logger.warning(
                "[rank %d step %d] %s: gave up after %.2f s on the save still running: not committed (its staging "
                "directory is removed at the next start)", rank, handle.step, when, waited_s,
            )
        elif handle.failed():
            logger.error("[rank %d step %d] %s: the save failed: %s", rank, handle.step, when, handle.exception())
        else:
            logger.info("[rank %d step %d] %s: committed %s after waiting %.2f s", rank, handle.step, when, handle.path, waited_s)


def exit_drain(manager: Any) -> None:
    """Interpreter exit, main thread, before ``concurrent.futures`` joins the pool threads.

    For a manager nobody closed: wait (bounded) for the saves in flight and log each one's end,
    so no process ends with a save cut short unnoticed. The pool threads are not daemon
    threads: Python joins them after this anyway, however long a stuck write takes.
    """
    if manager._closed or manager._pid != os.getpid():
        return
    manager._closed = True
    in_flight = [h for h in manager._unsettled if not h.done()]
    unseen = [h for h in manager._unsettled if h.failed() and not h.observed and h not in in_flight]
    if in_flight:
        logger.warning(
            "[rank %d] exiting without CheckpointManager.close(): waiting up to %.0f s for %d save(s) in flight: %s",
            manager.topology.rank, manager._bounded_wait_s(), len(in_flight), steps_text(in_flight),
        )
        started = time.monotonic()
        deadline = started + manager._bounded_wait_s()
        for handle in in_flight:
            try:
                handle._future.exception(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                break
        log_drained(manager.topology.rank, "at exit", in_flight + unseen, time.monotonic() - started)
    elif unseen:
        log_drained(manager.topology.rank, "at exit", unseen, 0.0)
    for pool in (manager._committer, manager._io, manager._copier):
        pool.shutdown(wait=False)


def steps_text(handles: Sequence[SaveHandle]) -> str:
    return ", ".join(f"step {h.step}" for h in handles)
