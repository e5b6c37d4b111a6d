"""SIGINT and SIGTERM during ``train()``: the handlers only take note; the loop acts at a step boundary.

``SignalWatcher`` is entered by ``BaseTrainer.train()`` on the main thread (only the main thread
may install handlers, and Python runs them only there, between two bytecodes). The handlers set
a few attributes and write one line to stderr with ``os.write``: no lock, no logging, no
collective, since they may interrupt any of those. The loop reads ``request()`` at every step
boundary and the ranks agree on it there (``control.StepBoundary``). The rules:

* the first SIGINT or SIGTERM: stop at the next step boundary, on every rank together;
* a signal within ``REPEAT_WINDOW_S`` of the first: the same request delivered twice (a terminal
  and torchrun both forward Ctrl+C; slurmstepd and torchrun both forward SIGTERM): noted only;
* SIGTERM again: noted only (the stop is under way; ``interrupt_grace_s`` bounds it);
* SIGINT again, later: abort. ``KeyboardInterrupt`` is raised at once from the handler, and
  ``train()`` leaves without waiting for saves in flight (``exit_at_shutdown``). No checkpoint
  is torn by that: a save becomes ``checkpoint-N`` only by one rename once it is complete.

Exit status: ``128 + signal number``, 130 for SIGINT and 143 for SIGTERM, what shells and
schedulers expect of a process that a signal stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import SaveHandle
from .state import TrainOutput

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 0.5  # a signal this soon after the first is the same request delivered twice
SIGNAL_CODES = {signal.SIGINT: 1, signal.SIGTERM: 2}  # agreed with MAX: SIGTERM (preemption) wins


def exit_code(signum: int) -> int:
    """The conventional exit status of a process stopped by ``signum``: 130 (SIGINT), 143 (SIGTERM)."""
    return 128 + int(signum)


class TrainingInterrupted(SystemExit):
    """``train()`` stopped for SIGINT or SIGTERM; every save has ended. Exit status 130 or 143.

    A ``SystemExit``, so ``python train.py`` exits with the conventional status and no traceback,
    and a scheduler sees a job that a signal stopped (requeue it). Catch it to run more code
    before exiting; ``output`` is what ``train()`` would have returned. With
    ``TrainingArguments(exit_on_interrupt=False)`` ``train()`` returns instead.
    """

    def __init__(self, code: int, output: TrainOutput) -> None:
        super().__init__(code)
        self.output = output


class SignalWatcher:
    """Installs the SIGINT/SIGTERM handlers for the length of a ``with`` block (main thread only).

    ``signum``, ``first_at`` and ``aborted`` are written by the handlers and read by the training
    thread (the same main thread): plain attribute stores, nothing to lock.
    """

    def __init__(self, enabled: bool = True, rank: int = 0) -> None:
        self.enabled = enabled
        self.rank = rank
        self.signum: int | None = None  # the strongest signal received (SIGTERM over SIGINT)
        self.first_at: float | None = None  # time.monotonic() of the first one
        self.aborted = False  # a second Ctrl+C arrived: KeyboardInterrupt was raised
        self.installed = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "SignalWatcher":
        if not self.enabled:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.info("[rank %d] train() runs outside the main thread: SIGINT and SIGTERM keep their handlers", self.rank)
            return self
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def request(self) -> tuple[int, float]:
        """(signal code: 0 none, 1 SIGINT, 2 SIGTERM; seconds since the first signal). Training thread."""
        if self.signum is None or self.first_at is None:
            return 0, 0.0
        return SIGNAL_CODES[self.signum], time.monotonic() - self.first_at

    def _handle(self, signum: int, frame: Any) -> None:
        """Runs on the main thread between bytecodes: note the signal; raise only to abort.

        A forked DataLoader worker inherits the handler and gets the terminal's Ctrl+C too: there
        it does nothing, so the worker keeps serving batches until the trainer shuts it down.
        """
        if os.getpid() != self._pid:
            return
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.first_at is None:
            self.first_at, self.signum = now, signum
            _say(f"[rank {self.rank}] {name}: stopping at the next step boundary" + (" (Ctrl+C again to abort)" if signum == signal.SIGINT else ""))
            return
        if signum == signal.SIGTERM:
            self.signum = signal.SIGTERM
            return
        if now - self.first_at < REPEAT_WINDOW_S:
            return
        self.aborted = True
        _say(f"[rank {self.rank}] {name} again: aborting without waiting for saves in flight")
        raise KeyboardInterrupt


def _say(message: str) -> None:
    try:
        os.write(2, f"async_ckpt: {message}\n".encode())
    except OSError:
        pass


def exit_at_shutdown(code: int, in_flight: Sequence[SaveHandle], rank: int) -> None:
    """After an abort or a missed grace budget: let interpreter exit end the process with ``code``.

    Python joins the checkpoint threads at exit (they are not daemon threads), so a save still
    writing would keep the process alive past the second Ctrl+C or the scheduler's grace. This
    registers a hook that runs before that join: if any of ``in_flight`` is still running, it
    logs them, flushes logs and streams and calls ``os._exit(code)``. Nothing of those saves is
    committed; the next start removes their staging directories. Training thread.
    """
    handles = list(in_flight)
    pid = os.getpid()

    def hook() -> None:
        running = [h for h in handles if not h.done()]
        if not running or os.getpid() != pid:
            return
        logger.warning(
            "[rank %d] exiting with status %d without waiting for the save(s) of step(s) %s: not committed; "
            "the next start removes their staging directories", rank, code, ", ".join(str(h.step) for h in running),
        )
        logging.shutdown()  # flushes every handler: os._exit skips the atexit hook that would
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing to flush
                pass
        os._exit(code)

    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(hook)
    except RuntimeError:  # already shutting down: Python joins the threads as usual
        pass
