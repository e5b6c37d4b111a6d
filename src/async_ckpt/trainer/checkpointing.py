"""The trainer's side of one ``train()`` call's checkpoints: resume, save policy, drain.

Everything here runs on the training thread, on every rank in the same order (the manager's
``save`` and ``load`` are collective). Policy:

* a save whose background write fails is logged when its failure surfaces (at the next save)
  and training goes on: the next scheduled save is the retry;
* ``ReplicationValidationError`` propagates: ranks that should agree do not (a training bug);
* the final save's failure raises from ``train()``, since nothing would retry it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import CheckpointError, CheckpointManager, CheckpointSaveError, ReplicationValidationError, SaveHandle
from ..layout import list_committed

logger = logging.getLogger(__name__)

_SKIP_NOTES = {
    "optimizer": "the optimizer starts from fresh state",
    "scheduler": "the learning-rate schedule starts from its first step",
    "trainer": "training progress (global_step, epoch) starts from 0",
    "dataset": "the data position is lost: the current epoch restarts from its first batch",
    "rng": "random generators keep this run's seeds: dropout and augmentation differ from an uninterrupted run",
}


class TrainerCheckpoints:
    """Wraps one ``CheckpointManager`` for the length of a ``train()`` call."""

    def __init__(self, manager: CheckpointManager, rank: int) -> None:
        self.manager = manager
        self.rank = rank
        self.pending: list[SaveHandle] = []  # saves whose outcome nobody has looked at yet, oldest first
        self.last_saved: int | None = None  # the step of the newest save started (or resumed from)
        self.last_committed: Path | None = None  # the newest checkpoint known to have committed
        self.stalls: list[tuple[int, float]] = []  # (step, seconds save() blocked the training thread)

    def in_flight(self) -> bool:
        """Whether a save is still being written in the background. Never blocks."""
        return any(not handle.done() for handle in self.pending)

    def save(self, step: int, final: bool = False) -> None:
        """Save ``step`` unless it was already saved; returns once the state is staged."""
        if step == self.last_saved:
            return
        self.last_saved = step
        self._observe(block=final)  # the final save must not be skipped for a busy previous one
        for attempt in range(2):
            try:
                started = time.perf_counter()
                handle = self.manager.save(step)
                self.stalls.append((step, time.perf_counter() - started))
            except ReplicationValidationError:
                raise
            except CheckpointSaveError as exc:
                earlier = [h for h in self.pending if h.exception() is exc]
                if final and not earlier:
                    raise
                self._log_failure(earlier[0].step if earlier else step, exc)
                self.pending = [h for h in self.pending if h not in earlier]
                if not earlier or attempt:  # an earlier save's failure surfaced here: try this one once more
                    return
            else:
                if handle.skipped:  # on_busy="skip": this step is not saved; the final save may still do it
                    self.last_saved = None
                else:
                    self.pending.append(handle)
                return

    def finish(self) -> None:
        """Wait for every save to commit, then close the manager; the newest one's failure raises."""
        newest = self.pending.pop() if self.pending else None
        self._observe(block=True)
        if newest is not None:
            self.last_committed = newest.wait() or self.last_committed
        self.manager.close()

    def _observe(self, block: bool) -> None:
        """Log the failures of finished saves (all of them when ``block``), and forget them."""
        for handle in list(self.pending):
            if not (block or handle.done()):
                continue
            self.pending.remove(handle)
            try:
                self.last_committed = handle.wait() or self.last_committed
            except CheckpointSaveError as exc:
                self._log_failure(handle.step, exc)

    def _log_failure(self, step: int, exc: Exception) -> None:
        logger.error("[rank %d step %d] checkpoint save failed, training goes on: %s", self.rank, step, exc)

    def abort(self, exc: BaseException) -> None:
        """Training is unwinding with ``exc``: drain in-flight saves, log (not raise) their errors."""
        self.manager.__exit__(type(exc), exc, exc.__traceback__)

    def resume(self, target: bool | str | os.PathLike[str], state: Any) -> tuple[Path | None, list[str]]:
        """Load per ``resume_from_checkpoint``; log loaded / skipped / failed. Returns (path, skipped keys)."""
        resumed = self._load(target, state)
        ahead = [step for step, _ in list_committed(self.manager.output_dir) if step > state.global_step]
        if ahead and self.rank == 0:
            logger.warning(
                "[rank 0 step %d] %s already holds checkpoints of later steps (up to %d): an auto-resume picks the "
                "highest step, and retention keeps the highest ones; use a new output_dir to start a new run",
                state.global_step, self.manager.output_dir, max(ahead),
            )
        return resumed

    def _load(self, target: bool | str | os.PathLike[str], state: Any) -> tuple[Path | None, list[str]]:
        if target is False:
            logger.info("[rank %d] resume_from_checkpoint=False: starting fresh", self.rank)
            return None, []
        try:
            result = self.manager.load(None if target is True else target, strict=False)
        except CheckpointError as exc:
            logger.error("[rank %d] resume failed: loaded=[] skipped=[] failed: %s", self.rank, exc)
            raise
        if result is None:
            logger.info("[rank %d] no committed checkpoint under %s: starting fresh", self.rank, self.manager.output_dir)
            return None, []
        logger.info("[rank %d] resumed from %s at step %d: loaded=%s skipped=%s failed=[]", self.rank, result.path, state.global_step, result.loaded, result.skipped)
        for key in result.skipped:
            logger.warning("[rank %d] component '%s' not restored: %s", self.rank, key, _SKIP_NOTES.get(key, "it keeps its current state"))
        if state.global_step == result.step:
            self.last_saved = result.step
        return result.path, list(result.skipped)
