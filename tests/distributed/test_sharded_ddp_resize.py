"""DDPTrainer resumed on another world size (2 -> 1 and 1 -> 2), in both data modes.

Model, optimizer, scheduler and trainer progress are REPLICATED and load on any world size;
per-rank RNG is re-derived (one warning); the data position, counted in batches of the old
world size, is dropped with a warning and the epoch restarts. Checked: the resumed job starts
from exactly the saved model and optimizer, at the saved step, and trains to the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.trainer_child import state_of
from tests.distributed.test_trainers_ddp import STOP, TOTAL, _trainer
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _first(rank: int, world: int, out: str, mode: str) -> dict:
    trainer = _trainer(out, mode, stop_at=STOP)
    trainer.train()
    return state_of(trainer.model, trainer.optimizer)


def _resume(rank: int, world: int, out: str, mode: str) -> dict:
    trainer = _trainer(out, mode, fresh=False)
    seen: dict[str, Any] = {}
    step = trainer.training_step

    def first_step(batch: Any) -> torch.Tensor:
        if not seen:
            seen.update(state_of(trainer.model, trainer.optimizer))
        return step(batch)

    trainer.training_step = first_step
    result = trainer.train()
    return {
        "start": seen,
        "resumed_from": result.resumed_from.name if result.resumed_from else None,
        "steps": result.steps_this_run,
        "global_step": trainer.state.global_step,
    }


@pytest.mark.parametrize("mode", ["dispatch", "per-rank"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_ddp_resume_on_another_world_size(tmp_path: Path, mode: str, before: int, after: int) -> None:
    saved = run_ranks(_first, before, str(tmp_path), mode, timeout=120)[0]
    for got in run_ranks(_resume, after, str(tmp_path), mode, timeout=120):
        assert got["resumed_from"] == f"checkpoint-{STOP}" and got["global_step"] == TOTAL
        assert got["steps"] == TOTAL - STOP
        assert [k for k in saved if not torch.equal(saved[k], got["start"][k])] == []
