"""DDPTrainer on 2 gloo ranks: exact resume in both data modes, replication validation.

Exact resume: 30 steps straight equal 13 steps, a stop, and a resume to 30, bitwise on every
parameter and optimizer tensor, on every rank, with dropout and shuffled data over 6 epochs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.layout import LOCK_NAME
from tests.distributed.trainer_child import RegressionData, StopAt, new_model, state_of
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed

TOTAL, STOP = 30, 13


def _trainer(out: str, mode: str, stop_at: int | None = None, fresh: bool = True) -> Any:
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from async_ckpt.trainer.ddp import DDPTrainer, DDPTrainingArguments

    class Trainer(StopAt, DDPTrainer):
        pass

    args = DDPTrainingArguments(output_dir=out, max_steps=TOTAL, per_device_train_batch_size=4, save_steps=7, learning_rate=1e-2, logging_steps=0, dispatch_batches=mode == "dispatch")
    data = RegressionData()
    if mode == "user-loader":  # the guide's "Independent Data Loading": each rank its own shard
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = StatefulDataLoader(data, batch_size=4, sampler=sampler)
        trainer = Trainer(model=new_model(0 if fresh else 99), args=args, train_dataloader=loader)
    else:
        trainer = Trainer(model=new_model(0 if fresh else 99), args=args, train_dataset=data)
    trainer.stop_at = stop_at
    return trainer


def _exact_resume(rank: int, world: int, out: str, modes: list[str]) -> dict[str, Any]:
    results = {}
    for mode in modes:
        straight = _trainer(f"{out}/{mode}/straight", mode)
        straight.train()
        first = _trainer(f"{out}/{mode}/run", mode, stop_at=STOP)
        out1 = first.train()
        second = _trainer(f"{out}/{mode}/run", mode, fresh=False)
        out2 = second.train()
        a, b = state_of(straight.model, straight.optimizer), state_of(second.model, second.optimizer)
        results[mode] = {
            "differ": [k for k in a if not torch.equal(a[k], b[k])],
            "steps": (out1.steps_this_run, out2.steps_this_run, second.steps_run),
            "resumed_from": out2.resumed_from.name if out2.resumed_from else None,
            "epoch": second.state.epoch,
            "files": sorted(os.listdir(f"{out}/{mode}/run/checkpoint-{TOTAL}")),
        }
    return results


@pytest.mark.timeout(90)
def test_dispatch_batches_exact_resume(tmp_path: Path) -> None:
    for rank, result in enumerate(run_ranks(_exact_resume, 2, str(tmp_path), ["dispatch"], timeout=80)):
        got = result["dispatch"]
        assert got["differ"] == [], f"rank {rank}: {got['differ']}"
        assert got["steps"] == (STOP, TOTAL - STOP, TOTAL - STOP) and got["resumed_from"] == f"checkpoint-{STOP}"
        assert got["epoch"] == 5, "30 steps of 8 samples over 40 samples span 6 epochs"
        assert got["files"] == [
            "checkpoint_manifest.json", "dataset_state.pt", "model.safetensors", "optimizer_state.pt",
            "rng_state_rank_0.pt", "rng_state_rank_1.pt", "scheduler_state.pt", "trainer_state.pt",
        ]


@pytest.mark.timeout(90)
def test_per_rank_data_exact_resume(tmp_path: Path) -> None:
    for rank, result in enumerate(run_ranks(_exact_resume, 2, str(tmp_path), ["per-rank", "user-loader"], timeout=80)):
        for mode, got in result.items():
            assert got["differ"] == [], f"rank {rank} {mode}: {got['differ']}"
            assert got["steps"] == (STOP, TOTAL - STOP, TOTAL - STOP) and got["resumed_from"] == f"checkpoint-{STOP}"
            assert got["files"] == [
                "checkpoint_manifest.json", "dataset_state_rank_0.pt", "dataset_state_rank_1.pt", "model.safetensors",
                "optimizer_state.pt", "rng_state_rank_0.pt", "rng_state_rank_1.pt", "scheduler_state.pt", "trainer_state.pt",
            ], mode


def _diverge(rank: int, world: int, out: str) -> dict[str, Any]:
    from async_ckpt import ReplicationValidationError
    from async_ckpt.trainer.ddp import DDPTrainer, DDPTrainingArguments

    class Drifting(DDPTrainer):
        drift = "model"

        def training_step(self, batch: Any) -> torch.Tensor:
            loss = super().training_step(batch)
            if self.rank == 1 and self.state.global_step + 1 == 5:  # a bug on rank 1, just before the save at 5
                with torch.no_grad():
                    if self.drift == "model":
                        next(self.model.parameters()).add_(1e-3)
                    else:
                        next(iter(self.optimizer.state.values()))["exp_avg"].add_(1e-3)
            return loss

    seen = {}
    for drift in ("model", "optimizer"):
        Drifting.drift = drift
        args = DDPTrainingArguments(output_dir=f"{out}/{drift}", max_steps=10, per_device_train_batch_size=4, save_steps=5, logging_steps=0)
        try:
            Drifting(model=new_model(), args=args, train_dataset=RegressionData()).train()
            seen[drift] = ("returned", "")
        except ReplicationValidationError as exc:
            seen[drift] = (type(exc).__name__, str(exc))
        seen[drift + "_dirs"] = sorted(n for n in os.listdir(f"{out}/{drift}") if n != LOCK_NAME)
    return seen


@pytest.mark.timeout(90)
def test_a_diverged_rank_fails_replication_validation_on_every_rank(tmp_path: Path) -> None:
    results = run_ranks(_diverge, 2, str(tmp_path), timeout=80)
    for rank, seen in enumerate(results):
        for drift, level in (("model", "tensor"), ("optimizer", "quick")):
            kind, message = seen[drift]
            assert kind == "ReplicationValidationError", f"rank {rank} {drift}: {kind}"
            assert f"Replication validation failed for component '{drift}'" in message and f"({level} check)" in message
            assert seen[drift + "_dirs"] == [], "nothing may be committed from diverged replicas"
