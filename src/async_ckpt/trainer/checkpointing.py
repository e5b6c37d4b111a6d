"""The trainer's side of one ``train()`` call's checkpoints: resume, save policy, drain.

Everything here runs on the training thread, on every rank in the same order (the manager's
``save`` and ``load`` are collective). Policy:

* a save whose background write fails is logged when its failure surfaces (at the next save)
  and training goes on: the next scheduled save is the retry;
* ``ReplicationValidationError`` propagates: ranks that should agree do not (a training bug);
* the final save's failure raises from ``train()``, since nothing would retry it;
* a stop for a signal (``stop``) lets the saves in flight commit, takes one more save if asked
  and if it fits in the grace budget, and past the budget leaves without what still runs; its
  save failures are logged, not raised (the process is on its way out).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import CheckpointConfigError, CheckpointError, CheckpointManager, CheckpointSaveError, ReplicationValidationError, SaveHandle
from .. import rundir
from ..layout import list_committed
from .control import Decision, StepBoundary
from .signals import exit_at_shutdown

logger = logging.getLogger(__name__)

_COST_FACTOR = 1.25  # a final save is estimated at this many times the last one's snapshot + persist time
_EXIT_MARGIN_S = 0.5  # plus this, for the commit and the exit

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
        self.save_cost_s: float | None = None  # snapshot + persist seconds of the newest committed save
        self._prepared = False

    def prepare_once(self) -> None:
        """Allocate the staging buffers after this call's first optimizer step, once.

        AdamW creates its state at its first step, so that is the earliest moment the buffers can
        match the state; the first save then stalls about as long as the later ones instead of
        also faulting in fresh memory (docs/performance.md, "Targets": the first save). Training thread; not collective. Blocks for the allocation. A
        component whose ``state_dict()`` fails here is logged, not raised: the save that meets
        the same failure reports it the way every failed save does.
        """
        if self._prepared:
            return
        self._prepared = True
        try:
            self.manager.prepare()
        except Exception as exc:
            logger.warning("[rank %d] could not allocate the staging buffers ahead of the first save (it will): %s: %s", self.rank, type(exc).__name__, exc)

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
                self._committed(handle, handle.wait())
            except CheckpointSaveError as exc:
                self._log_failure(handle.step, exc)

    def _committed(self, handle: SaveHandle, path: Path | None) -> None:
        self.last_committed = path or self.last_committed
        if path is not None:
            timings = handle.timings
            self.save_cost_s = timings.get("validate_s", 0.0) + timings.get("snapshot_s", 0.0) + timings.get("persist_s", 0.0)

    def _log_failure(self, step: int, exc: Exception) -> None:
        logger.error("[rank %d step %d] checkpoint save failed, training goes on: %s", self.rank, step, exc)

    def stop(self, step: int, decision: Decision, boundary: StepBoundary) -> None:
        """Every rank, at the boundary where they agreed to stop: end this call's checkpoints.

        Lets the saves in flight commit; saves ``step`` if ``decision.save`` (and it is not saved
        yet) and, with a ``deadline``, every rank expects it to finish in time (one
        ``all_reduce``); closes the manager. A save still running at the deadline is left behind:
        the process then exits at once at interpreter exit (``exit_at_shutdown``).
        """
        deadline = decision.deadline
        left = "" if deadline is None else f", {deadline - time.monotonic():.1f} s of interrupt_grace_s left"
        logger.info("[rank %d step %d] stopping for %s%s", self.rank, step, decision.reason, left)
        drained = self.drain(deadline)
        if decision.save and step != self.last_saved:
            save, why = True, ""
            if deadline is not None:
                fits, why = self._fits(deadline) if drained else (False, "a save in flight is still running")
                save = boundary.all_agree(fits)
                if not save:
                    logger.warning("[rank %d step %d] skipping the final save: it would not commit within interrupt_grace_s (%s)",
                                   self.rank, step, why if not fits else "another rank's estimate")
            if save:
                self.save(step, final=True)
                drained = self.drain(deadline)
        if drained:
            self.finish()
        else:
            exit_at_shutdown(decision.exit_code, self.abandon(), self.rank)

    def drain(self, deadline: float | None = None) -> bool:
        """Wait until every save in flight has ended, or until ``deadline`` (``time.monotonic()``).

        Training thread. Logs what it waits for and how each save ended; failures are logged, not
        raised. False when a save is still running at the deadline (it stays pending).
        """
        running = [h.step for h in self.pending if not h.done()]
        if running:
            logger.info("[rank %d] waiting for the save(s) in flight to commit: step(s) %s", self.rank, ", ".join(map(str, running)))
        for handle in list(self.pending):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._committed(handle, handle.wait(timeout))
            except CheckpointSaveError as exc:
                if not handle.done():
                    logger.warning("[rank %d step %d] the save is still running at the end of interrupt_grace_s", self.rank, handle.step)
                    return False
                logger.error("[rank %d step %d] checkpoint save failed: %s", self.rank, handle.step, exc)
            self.pending.remove(handle)
        return True

    def _fits(self, deadline: float) -> tuple[bool, str]:
        """Whether a save started now should commit before ``deadline``, and why (from the last save's cost)."""
        left = deadline - time.monotonic()
        if self.save_cost_s is None:
            return left > _EXIT_MARGIN_S, f"{left:.2f} s left; no save of this run committed yet to estimate from"
        needed = _COST_FACTOR * self.save_cost_s + _EXIT_MARGIN_S
        return needed <= left, f"estimated {needed:.2f} s, {left:.2f} s left"

    def abandon(self) -> list[SaveHandle]:
        """Close the manager without waiting (an abort, or the grace budget spent); return the saves still running."""
        running = [h for h in self.pending if not h.done()]
        try:
            self.manager.close(timeout=0)
        except CheckpointError as exc:  # the saves still running: close() logged each of them
            logger.debug("[rank %d] closing without waiting: %s", self.rank, exc)
        return running

    def abort(self, exc: BaseException) -> None:
        """Training is unwinding with ``exc``: drain in-flight saves, log (not raise) their errors."""
        self.manager.__exit__(type(exc), exc, exc.__traceback__)

    def resume(self, target: bool | str | os.PathLike[str], state: Any, overwrite: bool = False) -> tuple[Path | None, list[str]]:
        """Load per ``resume_from_checkpoint``; log loaded / skipped / failed. Returns (path, skipped keys)."""
        if target is False:
            fresh_start(self.manager.output_dir, overwrite, self.rank)
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
            self.last_committed = result.path  # a rerun of a finished job returns the checkpoint it found
        return result.path, list(result.skipped)


# --------------------------------------------------------------------- a fresh start (issue 15)


def fresh_start(output_dir: Path, overwrite: bool, rank: int) -> None:
    """``resume_from_checkpoint=False`` into ``output_dir``: refuse it if it holds checkpoints,
    unless ``overwrite_output_dir=True``, which deletes them first (rank 0, through ``rundir``).

    Training thread, every rank, right after the manager is built (it owns the directory, and
    start-up recovery is done, so every rank lists the same checkpoints). Two runs never mix
    under one directory: resume and retention would take the old run's higher steps for this one's.
    """
    steps = [step for step, _ in list_committed(output_dir)]
    if not steps:
        return
    if not overwrite:
        raise CheckpointConfigError(
            f"[rank {rank}] resume_from_checkpoint=False, but {output_dir} holds checkpoints of another run "
            f"(steps {', '.join(map(str, steps[-3:]))}{' ...' if len(steps) > 3 else ''}): resume (resume_from_checkpoint=True), "
            "use a new output_dir, or pass overwrite_output_dir=True to delete them"
        )
    if rank == 0:
        logger.warning("[rank 0] overwrite_output_dir=True: deleting the %d checkpoint(s) of the previous run in %s: steps %s",
                       len(steps), output_dir, ", ".join(map(str, steps)))
        rundir.delete_all(Path(output_dir))
