"""A rerun of a finished job says so and returns the checkpoint it found; train(resume_from_checkpoint=...) as in HF."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from async_ckpt.errors import CheckpointConfigError
from async_ckpt.trainer import Trainer, TrainingArguments
from tests.distributed.trainer_child import RegressionData, new_model

pytestmark = pytest.mark.timeout(60)


def _trainer(out: Path, **overrides) -> Trainer:
    options = dict(max_steps=6, per_device_train_batch_size=4, save_steps=3, logging_steps=0)
    options.update(overrides)
    return Trainer(model=new_model(), args=TrainingArguments(str(out), **options), train_dataset=RegressionData())


def test_rerun_of_a_finished_job_returns_its_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _trainer(tmp_path / "run").train()
    assert first.last_checkpoint == tmp_path / "run" / "checkpoint-6"
    with caplog.at_level(logging.WARNING, logger="async_ckpt.trainer.base"):
        again = _trainer(tmp_path / "run").train()
    assert again.steps_this_run == 0 and again.global_step == 6
    assert again.resumed_from == again.last_checkpoint == tmp_path / "run" / "checkpoint-6"
    assert "training already finished at step 6" in caplog.text


def test_train_resume_from_checkpoint_argument_overrides_the_args(tmp_path: Path) -> None:
    _trainer(tmp_path / "run").train()
    with pytest.raises(CheckpointConfigError, match="overwrite_output_dir=True"):  # another run's checkpoints
        _trainer(tmp_path / "run", max_steps=3).train(resume_from_checkpoint=False)
    fresh = _trainer(tmp_path / "run", max_steps=3, overwrite_output_dir=True).train(resume_from_checkpoint=False)
    assert fresh.resumed_from is None and fresh.steps_this_run == 3
    picked = _trainer(tmp_path / "run", resume_from_checkpoint=False).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert picked.resumed_from == tmp_path / "run" / "checkpoint-3" and picked.steps_this_run == 3
