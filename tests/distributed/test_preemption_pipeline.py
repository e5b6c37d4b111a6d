"""PipelineTrainer on 2 gloo ranks: a SIGTERM that only the last stage receives stops both stages.

Stage 1 (rank 1) signals itself during step 11; the ranks agree at that step boundary, both save
their own stage of step 11 and return (``exit_on_interrupt=False``) with the reason. A restart
with differently initialised stages resumes from checkpoint-11 and ends bitwise equal to a run
that was never stopped.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch

from tests.distributed.test_trainers_pipeline import _mse, _split
from tests.distributed.trainer_child import RegressionData, new_model, state_of
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed

TOTAL, AT = 20, 11


def _trainer(out: str, at: int | None = None, fresh: bool = True) -> Any:
    from async_ckpt.trainer.pipeline import PipelineTrainer, PipelineTrainingArguments

    class Trainer(PipelineTrainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            loss = super().training_step(batch)
            if self.rank == 1 and self.state.global_step + 1 == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

    args = PipelineTrainingArguments(
        output_dir=out, max_steps=TOTAL, per_device_train_batch_size=4, n_microbatches=2, save_steps=7,
        learning_rate=1e-2, logging_steps=0, exit_on_interrupt=False,
    )
    return Trainer(model=new_model(0 if fresh else 99), args=args, model_splitter=_split, train_dataset=RegressionData(), loss_fn=_mse)


def _stop_and_resume(rank: int, world: int, out: str) -> dict[str, Any]:
    from async_ckpt.layout import list_committed

    straight = _trainer(f"{out}/straight")
    straight.train()
    stopped = _trainer(f"{out}/run", at=AT).train()
    committed = [step for step, _ in list_committed(f"{out}/run")]
    resumed = _trainer(f"{out}/run", fresh=False)
    output = resumed.train()
    a, b = state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer)
    return {
        "stopped": (stopped.global_step, stopped.stop_reason, stopped.exit_code),
        "committed": committed,
        "resumed_from": output.resumed_from.name if output.resumed_from else None,
        "differ": [k for k in a if not torch.equal(a[k], b[k])],
        "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }


@pytest.mark.timeout(90)
def test_sigterm_to_the_last_stage_stops_both_stages_at_the_same_step(tmp_path: Any) -> None:
    for rank, got in enumerate(run_ranks(_stop_and_resume, 2, str(tmp_path), timeout=80)):
        assert got["stopped"] == (AT, "SIGTERM", 143), f"rank {rank}: {got}"
        assert got["committed"] == [7, AT] and got["resumed_from"] == f"checkpoint-{AT}", f"rank {rank}: {got}"
        assert got["differ"] == [] and got["handler_restored"], f"rank {rank}: {got}"
