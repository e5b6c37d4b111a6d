"""PipelineTrainer on 2 gloo ranks (one stage each): exact resume, files, world-size refusal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.trainer_child import RegressionData, StopAt, new_model, state_of
from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = pytest.mark.distributed

TOTAL, STOP = 30, 13


def _split(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Two stages on two ranks, one on one rank (the refusal test)."""
    world = torch.distributed.get_world_size()
    return [model.layers] if world == 1 else [model.layers[0:3], model.layers[3:]]


def _mse(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output.squeeze(-1), labels)


def _trainer(out: str, schedule: str, stop_at: int | None = None, fresh: bool = True) -> Any:
    from async_ckpt.trainer.pipeline import PipelineTrainer, PipelineTrainingArguments

    class Trainer(StopAt, PipelineTrainer):
        pass

    args = PipelineTrainingArguments(
        output_dir=out, max_steps=TOTAL, per_device_train_batch_size=4, n_microbatches=2, pipeline_schedule=schedule,
        save_steps=7, learning_rate=1e-2, logging_steps=0,
    )
    trainer = Trainer(model=new_model(0 if fresh else 99), args=args, model_splitter=_split, train_dataset=RegressionData(), loss_fn=_mse)
    trainer.stop_at = stop_at
    return trainer


def _exact_resume(rank: int, world: int, out: str) -> dict[str, Any]:
    results = {}
    for schedule in ("gpipe", "1f1b"):
        straight = _trainer(f"{out}/{schedule}/straight", schedule)
        straight.train()
        first = _trainer(f"{out}/{schedule}/run", schedule, stop_at=STOP)
        out1 = first.train()
        second = _trainer(f"{out}/{schedule}/run", schedule, fresh=False)
        out2 = second.train()
        a, b = state_of(straight.model, straight.optimizer), state_of(second.model, second.optimizer)
        results[schedule] = {
            "differ": [k for k in a if not torch.equal(a[k], b[k])],
            "compared": len(a),
            "steps": (out1.steps_this_run, out2.steps_this_run, second.steps_run),
            "resumed_from": out2.resumed_from.name if out2.resumed_from else None,
            "loss": (straight.history[-1]["loss"], second.history[-1]["loss"]) if straight.history else None,
            "files": sorted(os.listdir(f"{out}/{schedule}/run/checkpoint-{TOTAL}")),
        }
    return results


@pytest.fixture(scope="module")
def two_stage_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("pipeline")
    return out, run_ranks(_exact_resume, 2, str(out), timeout=100)


@pytest.mark.timeout(120)
def test_two_stage_exact_resume_with_gpipe_and_1f1b(two_stage_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_stage_runs
    for rank, result in enumerate(results):
        for schedule, got in result.items():
            assert got["differ"] == [] and got["compared"] > 0, f"rank {rank} {schedule}: {got['differ']}"
            assert got["steps"] == (STOP, TOTAL - STOP, TOTAL - STOP) and got["resumed_from"] == f"checkpoint-{STOP}"
            assert got["files"] == [
                "checkpoint_manifest.json", "dataset_state.pt", "model_state_rank_0.safetensors", "model_state_rank_1.safetensors",
                "optimizer_state_rank_0.pt", "optimizer_state_rank_1.pt", "rng_state_rank_0.pt", "rng_state_rank_1.pt",
                "scheduler_state.pt", "trainer_state.pt",
            ]
    # every stage holds different parameters: stage 0 has 2 linear layers, stage 1 has 2
    assert results[0]["gpipe"]["compared"] > 0 and results[1]["gpipe"]["compared"] > 0


def _resume_with_one_rank(rank: int, world: int, out: str) -> str:
    trainer = _trainer(out, "gpipe")
    trainer.train()
    return "trained"


@pytest.mark.timeout(120)
def test_resuming_with_another_world_size_is_refused(two_stage_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = two_stage_runs
    (outcome,) = run_ranks_expect(_resume_with_one_rank, 1, str(out / "gpipe" / "run"), timeout=60)
    assert outcome[0] == "error" and outcome[1] == "CheckpointLoadError", outcome
    assert "saved with world size 2, this job has 1" in outcome[2] and "resume with 2 ranks" in outcome[2]


def test_stage_files_use_full_model_names_and_export_into_the_unsplit_model(two_stage_runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from async_ckpt.export import export_model

    out, _ = two_stage_runs
    checkpoint = out / "gpipe" / "run" / f"checkpoint-{TOTAL}"
    exported = export_model(checkpoint, tmp_path / "export")
    state = load_file(str(exported.path))
    full = new_model(0)
    assert sorted(state) == sorted(full.state_dict()), "stage files must be keyed by the full model's names"
    full.load_state_dict(state, strict=True)
    assert exported.sources == ["model_state_rank_0.safetensors", "model_state_rank_1.safetensors"]
