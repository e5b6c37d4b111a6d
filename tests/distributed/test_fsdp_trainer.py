"""FSDPTrainer on gloo: exact resume on the same world size, and resume on another one.

2 ranks: 12 steps straight equal 5 steps, a stop, and a resume to 12, bitwise on every full
parameter and AdamW moment (dropout and shuffled dispatched data included). Then a 1-rank
FSDPTrainer resumes the 2-rank run's last checkpoint: its model and optimizer equal the 2-rank
job's full tensors bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_sharded_fsdp import full
from tests.distributed.trainer_child import RegressionData, StopAt, new_model
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed

TOTAL, STOP = 12, 5


def _trainer(out: str, stop_at: int | None = None, seed: int = 0) -> Any:
    from async_ckpt.trainer.fsdp import FSDPTrainer, FSDPTrainingArguments

    class Trainer(StopAt, FSDPTrainer):
        def shard_policy(self, model: torch.nn.Module) -> list[torch.nn.Module]:
            return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # one fully_shard per Linear

    args = FSDPTrainingArguments(
        output_dir=out,
        max_steps=TOTAL,
        per_device_train_batch_size=2,
        save_steps=STOP,
        learning_rate=1e-2,
        logging_steps=0,
        async_save=True,
    )
    trainer = Trainer(model=new_model(seed, width=9), args=args, train_dataset=RegressionData())  # 9 rows: uneven on 2
    trainer.stop_at = stop_at
    return trainer


def _run(rank: int, world: int, out: str) -> dict | None:
    straight = _trainer(f"{out}/straight")
    straight.train()
    _trainer(f"{out}/run", stop_at=STOP).train()
    second = _trainer(f"{out}/run", seed=99)
    result = second.train()
    assert result.resumed_from is not None and result.resumed_from.name == f"checkpoint-{STOP}"
    from torch.distributed.tensor import DTensor

    assert isinstance(next(second.model.parameters()), DTensor)
    a, b = full(straight.model, straight.optimizer), full(second.model, second.optimizer)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    return {"differ": differ, "final": b} if rank == 0 else {"differ": differ}


def _on_one(rank: int, world: int, out: str) -> dict:
    trainer = _trainer(f"{out}/run", seed=7)
    trainer.args = trainer.args  # max_steps already reached: the run resumes and has nothing left to do
    result = trainer.train()
    assert result.resumed_from is not None and result.resumed_from.name == f"checkpoint-{TOTAL}"
    return full(trainer.model, trainer.optimizer)


def test_fsdp_trainer_exact_resume_and_another_world_size(tmp_path: Path) -> None:
    results = run_ranks(_run, 2, str(tmp_path), timeout=240)
    for rank, got in enumerate(results):
        assert got["differ"] == [], f"rank {rank}: {got['differ']}"
    files = sorted(p.name for p in (tmp_path / "run" / f"checkpoint-{TOTAL}").iterdir())
    assert "model_state_shard_1.safetensors" in files and "optimizer_state_shard_0.pt" in files
    on_one = run_ranks(_on_one, 1, str(tmp_path), timeout=240)[0]
    final = results[0]["final"]
    assert sorted(on_one) == sorted(final)
    assert [k for k in final if not torch.equal(final[k], on_one[k])] == []
