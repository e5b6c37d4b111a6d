"""Stop and save requests, agreed by every rank at a step boundary.

Requests come from signals (``signals.SignalWatcher``, on any rank) and from the control file
``<output_dir>/async_ckpt.control``, which rank 0 reads and removes; ``async-ckpt ctl DIR
COMMAND`` or any script writes it: one word, ``save`` | ``save-and-stop`` | ``stop``, or
``{"command": "save"}``. After every step each rank calls ``StepBoundary.poll()`` on its
training thread; it merges the requests of all ranks with one ``all_reduce(MAX)`` of three
integers over the checkpoint manager's gloo coordination group (none with one process), so every
rank takes the same ``Decision`` at the same step::

    slot 0  signal    0 none, 1 SIGINT, 2 SIGTERM                  MAX: SIGTERM (preemption) wins
    slot 1  control   0 none, 1 save, 2 stop, 3 save-and-stop      only rank 0 reads the file
    slot 2  milliseconds since this rank's first signal            MAX: the earliest signal counts
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .signals import SignalWatcher, exit_code

logger = logging.getLogger(__name__)

CONTROL_FILE = "async_ckpt.control"
NONE, SAVE, STOP, SAVE_AND_STOP = 0, 1, 2, 3
COMMANDS = {"save": SAVE, "stop": STOP, "save-and-stop": SAVE_AND_STOP}
_NAMES = {code: name for name, code in COMMANDS.items()}
_SIGNALS = {1: signal.SIGINT, 2: signal.SIGTERM}


@dataclass(frozen=True)
class Decision:
    """What every rank does at this step boundary; the same on every rank."""

    save: bool = False  # save the current step now
    stop: bool = False  # end training here
    reason: str | None = None  # "SIGINT" | "SIGTERM" | the control command ("save", "stop", "save-and-stop")
    exit_code: int = 0  # 130 or 143 after a signal, else 0
    deadline: float | None = None  # time.monotonic() by which to be gone (interrupt_grace_s); None: no limit


def decide(
    signal_code: int, control: int, elapsed_s: float, *, save_on_interrupt: bool | None, save_strategy: str,
    grace_s: float | None, now: float,
) -> Decision:
    """The decision for agreed requests (pure). A signal stops; it saves per ``save_on_interrupt``
    (None: SIGTERM saves unless ``save_strategy="no"``, SIGINT does not), or when the control file
    asks too. ``deadline`` counts ``grace_s`` from the earliest signal, ``elapsed_s`` ago."""
    if signal_code:
        signum = _SIGNALS[signal_code]
        wanted = save_on_interrupt if save_on_interrupt is not None else signum == signal.SIGTERM and save_strategy != "no"
        deadline = None if grace_s is None else now + grace_s - elapsed_s
        return Decision(bool(wanted) or control in (SAVE, SAVE_AND_STOP), True, signum.name, exit_code(signum), deadline)
    if control == NONE:
        return Decision()
    return Decision(control in (SAVE, SAVE_AND_STOP), control in (STOP, SAVE_AND_STOP), _NAMES[control])


def parse_command(text: str) -> int:
    """The command code of a control file's text: a word or ``{"command": word}``; ValueError else."""
    text = text.strip()
    word: Any = text
    if text.startswith("{"):
        try:
            word = json.loads(text).get("command")
        except (ValueError, AttributeError):
            raise ValueError(f"not a JSON object with a 'command': {text[:80]!r}") from None
    if not isinstance(word, str) or word.strip().lower().replace("_", "-") not in COMMANDS:
        raise ValueError(f"unknown command {str(word)[:80]!r}: use one of {', '.join(COMMANDS)}")
    return COMMANDS[word.strip().lower().replace("_", "-")]


def write_command(output_dir: str | os.PathLike[str], command: str) -> Path:
    """Ask the job writing to ``output_dir`` to ``save``, ``save-and-stop`` or ``stop``; return the file.

    Any process, any time. Written under a temporary name and renamed, so rank 0 never reads half
    a file; a command not yet picked up is replaced.
    """
    parse_command(command)
    path = Path(output_dir) / CONTROL_FILE
    tmp = path.with_name(f".{CONTROL_FILE}.tmp-{os.getpid()}")
    tmp.write_text(command.strip() + "\n")
    os.replace(tmp, path)
    return path


def take_command(output_dir: str | os.PathLike[str]) -> int:
    """Rank 0: claim the control file (rename, read, delete) and return its command; NONE if absent.

    A file that does not parse is removed with an error logged, so it is not read at every step.
    """
    path = Path(output_dir) / CONTROL_FILE
    taken = path.with_name(f".{CONTROL_FILE}.taken-{os.getpid()}")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return NONE
    except OSError as exc:  # e.g. no permission: training goes on
        logger.warning("[rank 0] cannot take the control file %s: %s", path, exc)
        return NONE
    try:
        text = taken.read_text(errors="replace")
    finally:
        taken.unlink(missing_ok=True)
    try:
        return parse_command(text)
    except ValueError as exc:
        logger.error("[rank 0] ignoring the control file %s: %s", path, exc)
        return NONE


class StepBoundary:
    """One per ``train()`` call: the requests of every rank, merged at each step boundary."""

    def __init__(self, watcher: SignalWatcher, args: Any, *, rank: int, world_size: int, group: Any) -> None:
        self.watcher = watcher
        self.args = args
        self.rank = rank
        self.world_size = world_size
        self.group = group  # the manager's coordination group: gloo, training thread only
        self._next_check = 0.0  # time.monotonic() of rank 0's next look at the control file

    def poll(self, step: int) -> Decision:
        """Every rank, training thread, after each step: the decision all ranks share.

        One ``all_reduce`` of a 3-element int64 tensor when there are several ranks; rank 0 also
        looks for the control file, at most every ``args.control_poll_s`` seconds.
        """
        signal_code, elapsed_s = self.watcher.request()
        control = self._control(step) if self.rank == 0 else NONE
        if self.world_size > 1 and self.group is not None:
            box = torch.tensor([signal_code, control, int(elapsed_s * 1000)], dtype=torch.int64)
            dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
            signal_code, control, elapsed_s = int(box[0]), int(box[1]), int(box[2]) / 1000
        args = self.args
        return decide(signal_code, control, elapsed_s, save_on_interrupt=args.save_on_interrupt, save_strategy=args.save_strategy,
                      grace_s=args.interrupt_grace_s, now=time.monotonic())

    def all_agree(self, vote: bool) -> bool:
        """Every rank, at the same point: True when every rank votes True (one ``all_reduce(MIN)``)."""
        if self.world_size == 1 or self.group is None:
            return vote
        box = torch.tensor([int(vote)], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.group)
        return bool(box.item())

    def _control(self, step: int) -> int:
        every = self.args.control_poll_s
        now = time.monotonic()
        if every is None or now < self._next_check:
            return NONE
        self._next_check = now + every
        command = take_command(self.args.output_dir)
        if command != NONE:
            logger.info("[rank 0 step %d] control file: %s", step, _NAMES[command])
        return command
