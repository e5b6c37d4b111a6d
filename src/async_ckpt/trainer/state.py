"""Training progress (the ``trainer`` component, ``trainer_state.pt``) and what ``train()`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KEYS = ("global_step", "epoch", "steps_in_epoch", "samples_seen")


@dataclass
class TrainerState:
    """Where training stands. Saved in every checkpoint; its ``global_step`` is the checkpoint's step.

    Mutated only by the trainer's loop on the training thread; ``state_dict()`` is called by the
    checkpoint manager during ``save()`` and ``load_state_dict()`` during ``load()``.
    """

    global_step: int = 0  # optimizer steps taken since the very first run
    epoch: int = 0  # current epoch, counted from 0; its data order is a function of (seed, epoch)
    steps_in_epoch: int = 0  # batches of the current epoch already trained on
    samples_seen: int = 0  # training samples consumed by all ranks together

    def state_dict(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in _KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in _KEYS if key not in state]
        if missing:
            raise KeyError(f"trainer state lacks {missing} (keys present: {sorted(state)})")
        for key in _KEYS:
            setattr(self, key, int(state[key]))


@dataclass
class TrainOutput:
    """What ``train()`` did in this call."""

    global_step: int  # the step training stopped at
    training_loss: float  # mean loss over the steps of this call (nan when none ran)
    steps_this_run: int  # optimizer steps taken by this call (excluding the resumed ones)
    resumed_from: Path | None = None  # the checkpoint this call started from, if any
    last_checkpoint: Path | None = None  # the newest checkpoint this call committed, if any
    skipped_components: list[str] = field(default_factory=list)  # optional components not restored on resume
    stop_reason: str | None = None  # why training ended early: "SIGINT", "SIGTERM", "stop", "save-and-stop"
    exit_code: int = 0  # the process exit status this ending calls for: 130 (SIGINT), 143 (SIGTERM), else 0
