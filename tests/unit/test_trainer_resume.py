"""Trainer (one process): 2N steps straight == N steps, a stop, and a resume to 2N, bitwise.

The model has dropout and the data a shuffling StatefulDataLoader (40 samples, batch 4: 10 steps
per epoch), so 30 steps span three epochs. Every comparison is ``torch.equal`` on every
parameter and optimizer tensor. Negative controls show that the comparison would notice a
resume that lost the RNG or the data position.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.trainer import TrainingArguments
from tests.distributed.trainer_child import RegressionData, StopTrainer, assert_bitwise_equal, new_model, state_of

pytestmark = pytest.mark.timeout(60)

TOTAL = 30


def _trainer(out: Path, stop_at: int | None = None, fresh: bool = True, **overrides: Any) -> StopTrainer:
    """A trainer; ``fresh=False`` gives it a differently initialised model, so only a load can make it match."""
    options = dict(output_dir=str(out), max_steps=TOTAL, per_device_train_batch_size=4, save_steps=7, learning_rate=1e-2, logging_steps=1)
    options.update(overrides)
    trainer = StopTrainer(model=new_model(seed=0 if fresh else 99), args=TrainingArguments(**options), train_dataset=RegressionData())
    trainer.stop_at = stop_at
    return trainer


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> StopTrainer:
    trainer = _trainer(tmp_path_factory.mktemp("straight") / "run")
    output = trainer.train()
    assert output.global_step == TOTAL and output.steps_this_run == TOTAL and output.resumed_from is None
    return trainer


def _losses(trainer: StopTrainer) -> dict[int, float]:
    return {int(e["step"]): e["loss"] for e in trainer.history}


@pytest.mark.parametrize("stop_at", [15, 10, 23], ids=["mid-epoch", "epoch-end", "third-epoch"])
def test_stop_and_resume_is_bitwise_equal_to_a_straight_run(straight: StopTrainer, tmp_path: Path, stop_at: int) -> None:
    first = _trainer(tmp_path / "run", stop_at=stop_at)
    out1 = first.train()
    assert out1.global_step == stop_at and out1.last_checkpoint == tmp_path / "run" / f"checkpoint-{stop_at}"
    second = _trainer(tmp_path / "run", fresh=False)
    out2 = second.train()
    assert out2.resumed_from == tmp_path / "run" / f"checkpoint-{stop_at}"
    assert out2.steps_this_run == TOTAL - stop_at and second.steps_run == TOTAL - stop_at, "the resume must train only the remaining steps"
    assert second.state.epoch == straight.state.epoch and second.state.samples_seen == straight.state.samples_seen == TOTAL * 4
    assert_bitwise_equal(state_of(straight.model, straight.optimizer), state_of(second.model, second.optimizer))
    expected = {s: l for s, l in _losses(straight).items() if s > stop_at}
    assert _losses(second) == expected


def test_resume_from_an_older_explicit_checkpoint(straight: StopTrainer, tmp_path: Path) -> None:
    _trainer(tmp_path / "run", stop_at=16).train()  # saves 7, 14 and the final 16
    resumed = _trainer(tmp_path / "run", fresh=False, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-14"))
    output = resumed.train()
    assert output.resumed_from == tmp_path / "run" / "checkpoint-14" and output.steps_this_run == TOTAL - 14
    assert_bitwise_equal(state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer))


def test_sync_saves_train_the_same_as_async_saves(straight: StopTrainer, tmp_path: Path) -> None:
    _trainer(tmp_path / "run", stop_at=12, async_save=False).train()
    resumed = _trainer(tmp_path / "run", fresh=False, async_save=False)
    resumed.train()
    assert_bitwise_equal(state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer))


def test_epoch_save_strategy_resumes_bitwise(straight: StopTrainer, tmp_path: Path) -> None:
    first = _trainer(tmp_path / "run", stop_at=25, save_strategy="epoch")
    first.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-25"]
    shutil.rmtree(tmp_path / "run" / "checkpoint-25")  # as if killed after the second epoch's save
    resumed = _trainer(tmp_path / "run", fresh=False, save_strategy="epoch")
    output = resumed.train()
    assert output.resumed_from == tmp_path / "run" / "checkpoint-20" and output.steps_this_run == 10
    assert_bitwise_equal(state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer))


@pytest.mark.parametrize("deleted", ["rng_state.pt", "dataset_state.pt"])
def test_negative_control_a_resume_without_rng_or_data_position_differs(straight: StopTrainer, tmp_path: Path, deleted: str) -> None:
    _trainer(tmp_path / "run", stop_at=15).train()
    (tmp_path / "run" / "checkpoint-15" / deleted).unlink()
    resumed = _trainer(tmp_path / "run", fresh=False)
    output = resumed.train()
    assert output.skipped_components == [deleted.split("_")[0]]
    a, b = state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer)
    assert any(not torch.equal(a[k], b[k]) for k in a), "the bitwise comparison must notice a lost component"


def test_a_finished_run_does_nothing_when_started_again(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", max_steps=5, save_steps=5).train()
    again = _trainer(tmp_path / "run", max_steps=5, save_steps=5)
    output = again.train()
    assert output.steps_this_run == 0 and output.global_step == 5 and again.steps_run == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-5"]
