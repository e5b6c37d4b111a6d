"""PipelineTrainer with dp_degree=2: 4 ranks as 2 data-parallel replicas of a 2-stage pipeline.

Each stage's model and optimizer are saved once (not once per replica), the dataset position
once per replica, the RNG per rank; a run stopped mid-way and resumed equals a straight run,
bitwise, on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.trainer_child import RegressionData, StopAt, new_model, state_of
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

TOTAL, STOP = 16, 7  # 40 samples / 2 replicas / 4 per batch: 5 steps an epoch, so 3+ epochs


def _split(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.layers[0:3], model.layers[3:]]


def _mse(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output.squeeze(-1), labels)


def _trainer(out: str, stop_at: int | None = None, fresh: bool = True) -> Any:
    from async_ckpt.trainer.pipeline import PipelineTrainer, PipelineTrainingArguments

    class Trainer(StopAt, PipelineTrainer):
        pass

    args = PipelineTrainingArguments(
        output_dir=out, max_steps=TOTAL, per_device_train_batch_size=4, n_microbatches=2, dp_degree=2,
        save_steps=5, learning_rate=1e-2, logging_steps=0,
    )
    trainer = Trainer(model=new_model(0 if fresh else 99), args=args, model_splitter=_split, train_dataset=RegressionData(), loss_fn=_mse)
    trainer.stop_at = stop_at
    return trainer


def _dp_x_pp(rank: int, world: int, out: str) -> dict[str, Any]:
    straight = _trainer(f"{out}/straight")
    straight.train()
    first = _trainer(f"{out}/run", stop_at=STOP)
    out1 = first.train()
    second = _trainer(f"{out}/run", fresh=False)
    out2 = second.train()
    a, b = state_of(straight.model, straight.optimizer), state_of(second.model, second.optimizer)
    replica_param = next(iter(straight.model.parameters())).detach().clone()
    return {
        "differ": [k for k in a if not torch.equal(a[k], b[k])],
        "compared": len(a),
        "steps": (out1.steps_this_run, out2.steps_this_run),
        "resumed_from": out2.resumed_from.name if out2.resumed_from else None,
        "param": replica_param,
        "stage": second.topology.stage,
    }


def test_dp_x_pp_pipeline_trainer_saves_each_stage_once_and_resumes_bitwise(tmp_path: Path) -> None:
    results = run_ranks(_dp_x_pp, 4, str(tmp_path), timeout=220)
    for rank, got in enumerate(results):
        assert got["differ"] == [] and got["compared"] > 0, f"rank {rank}: {got['differ']}"
        assert got["steps"] == (STOP, TOTAL - STOP) and got["resumed_from"] == f"checkpoint-{STOP}", got  # stop() saves the step it stopped at
    assert [r["stage"] for r in results] == [0, 1, 0, 1]
    assert torch.equal(results[0]["param"], results[2]["param"]) and torch.equal(results[1]["param"], results[3]["param"]), "replicas diverged"
    ckpt = tmp_path / "run" / f"checkpoint-{TOTAL}"
    files = sorted(os.listdir(ckpt))
    assert files == sorted([
        "checkpoint_manifest.json", "model_state_group_dp_0.safetensors", "model_state_group_dp_1.safetensors",
        "optimizer_state_group_dp_0.pt", "optimizer_state_group_dp_1.pt", "dataset_state_group_pp_0.pt", "dataset_state_group_pp_1.pt",
        "scheduler_state.pt", "trainer_state.pt", "rng_state_rank_0.pt", "rng_state_rank_1.pt", "rng_state_rank_2.pt", "rng_state_rank_3.pt",
    ]), files
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    assert manifest["metadata"]["mesh"] == {"dims": ["dp", "pp"], "shape": [2, 2]}
    assert manifest["components"]["model"]["ranks"] == [0, 1] and manifest["components"]["dataset"]["ranks"] == [0, 2]
