"""``SaveHandle``: the one return type of ``CheckpointManager.save()``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from .errors import CheckpointSaveError, CheckpointTimeoutError


class SaveHandle:
    """A save in flight: wait for it, poll it, or ``await`` it.

    The background commit thread resolves it (``_finish`` / ``_fail``) when rank 0's outcome is
    known, so every rank's handle ends the same way: the committed path, or the same
    ``CheckpointSaveError``. A failure is raised once on the training thread: by ``wait()``, by
    ``await``, or else by the manager's next ``save()``, ``wait()`` or ``close()``.
    """

    def __init__(self, step: int, path: Path, *, skipped: bool = False) -> None:
        self.step = step
        self.path = path  # where the checkpoint will be committed
        self.skipped = skipped  # True when on_busy="skip" dropped this save
        self.timings: dict[str, float] = {}  # stall_s etc., filled as phases finish
        self._future: concurrent.futures.Future[Path | None] = concurrent.futures.Future()
        self._released = threading.Event()  # staging buffers free for the next save
        self.observed = False  # the failure, if any, has reached the user
        if skipped:
            self._released.set()
            self._future.set_result(None)

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the save commits; return the committed directory (None when skipped).

        Called on the training thread. Raises the save's ``CheckpointSaveError`` on failure, or
        ``CheckpointTimeoutError`` if ``timeout`` seconds pass first (the save goes on).
        """
        try:
            result = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CheckpointTimeoutError(f"[step {self.step}] save not finished after waiting {timeout}s (path: {self.path})") from None
        except CheckpointSaveError:
            self.observed = True
            raise
        return result

    def done(self) -> bool:
        """Whether the save has committed or failed. Never blocks."""
        return self._future.done()

    def failed(self) -> bool:
        return self._future.done() and self._future.exception() is not None

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def __await__(self) -> Generator[Any, None, Path | None]:
        """``await handle`` in an asyncio loop: waits without blocking the loop."""
        try:
            return (yield from asyncio.wrap_future(self._future).__await__())
        except CheckpointSaveError:
            self.observed = True
            raise

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "failed" if self.failed() else "committed" if self.done() else "in flight"
        return f"SaveHandle(step={self.step}, {state}, path={str(self.path)!r})"

    # Called by the background commit thread.
    def _release(self) -> None:
        self._released.set()

    def _finish(self, path: Path) -> None:
        self._future.set_result(path)
        self._released.set()

    def _fail(self, error: CheckpointSaveError) -> None:
        self._future.set_exception(error)  # first, so a save() woken by the release already sees it
        self._released.set()
