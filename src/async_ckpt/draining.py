"""Draining saves in flight when a manager closes or the interpreter exits, and saying how each ended.

Each manager keeps its saves in an ``InFlight`` ledger built at construction (training thread);
``close()`` stops it, and for a manager nobody closed the hook registered here drains it on the
main thread at interpreter exit, before ``concurrent.futures`` joins the pool threads, so the wait
can be bounded and logged.
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

from .handle import SaveHandle

logger = logging.getLogger(__name__)

_OPEN: "weakref.WeakSet[InFlight]" = weakref.WeakSet()  # ledgers of managers not closed yet, drained at exit
_exit_hook_registered = False


class InFlight:
    """The saves one manager has started and not settled, the pools that run them, and how they end.

    Owned by ``CheckpointManager`` and called on the training thread (``add``, ``raise_unobserved``,
    ``stop`` from ``close()``), except ``drain_at_exit``, which the interpreter-exit hook runs on
    the main thread, before ``concurrent.futures`` joins the pool threads, for a manager nobody
    closed. Nothing here blocks except the bounded waits of ``drain_at_exit``.
    """

    def __init__(self, rank: int, pools: Sequence[concurrent.futures.Executor], bounded_wait_s: float) -> None:
        self.rank = rank
        self.pools = tuple(pools)
        self.bounded_wait_s = bounded_wait_s  # the longest one save can take, every phase's timeout included
        self.handles: list[SaveHandle] = []  # saves whose failure may not have been raised yet
        self.closed = False
        self._pid = os.getpid()  # a forked child inherits the manager but not its threads
        _register(self)

    def add(self, handle: SaveHandle) -> None:
        self.handles.append(handle)

    def running(self) -> list[SaveHandle]:
        return [h for h in self.handles if not h.done()]

    def raise_unobserved(self) -> None:
        """Raise the oldest finished save's failure that nobody has seen; forget settled saves."""
        for handle in list(self.handles):
            if not handle.done():
                continue
            self.handles.remove(handle)
            if handle.failed() and not handle.observed:
                handle.observed = True
                raise handle.exception()  # type: ignore[misc]

    def stop(self, waited_for: list[SaveHandle], started: float) -> bool:
        """At ``close()``, after its wait: log how ``waited_for`` ended, stop the pools; True if one still runs.

        The pools are joined only when no save is still running: a stuck write is left to its thread.
        """
        self.closed = True
        _OPEN.discard(self)
        running = [h for h in waited_for if not h.done()]
        if waited_for:
            log_drained(self.rank, "closing", waited_for, time.monotonic() - started)
        for pool in self.pools:
            pool.shutdown(wait=not running)
        return bool(running)

    def drain_at_exit(self) -> None:
        """Interpreter exit, main thread: wait (bounded) for the saves in flight and log each one's end.

        So no process ends with a save cut short unnoticed. The pool threads are not daemon
        threads: Python joins them after this anyway, however long a stuck write takes.
        """
        if self.closed or self._pid != os.getpid():
            return
        self.closed = True
        in_flight = self.running()
        unseen = [h for h in self.handles if h.failed() and not h.observed and h not in in_flight]
        if in_flight:
            logger.warning(
                "[rank %d] exiting without CheckpointManager.close(): waiting up to %.0f s for %d save(s) in flight: %s",
                self.rank, self.bounded_wait_s, len(in_flight), steps_text(in_flight),
            )
            started = time.monotonic()
            deadline = started + self.bounded_wait_s
            for handle in in_flight:
                try:
                    handle._future.exception(max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    break
            log_drained(self.rank, "at exit", in_flight + unseen, time.monotonic() - started)
        elif unseen:
            log_drained(self.rank, "at exit", unseen, 0.0)
        for pool in self.pools:
            pool.shutdown(wait=False)


def _register(saves: InFlight) -> None:
    """Have interpreter exit drain ``saves`` unless they are stopped first (one hook for all).

    ``threading._register_atexit`` runs hooks before the pool threads are joined (``atexit`` runs
    them after): only there can the wait be bounded and logged. Holds the ledgers weakly.
    """
    global _exit_hook_registered
    _OPEN.add(saves)
    if _exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(_drain_open)
    except RuntimeError:  # the interpreter is already shutting down
        return
    _exit_hook_registered = True


def _drain_open() -> None:
    for saves in list(_OPEN):
        try:
            saves.drain_at_exit()
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


def steps_text(handles: Sequence[SaveHandle]) -> str:
    return ", ".join(f"step {h.step}" for h in handles)
