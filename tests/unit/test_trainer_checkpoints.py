"""Trainer (one process): what lands on disk, partial resume, custom components, failed saves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch.utils.data import DataLoader, TensorDataset

from async_ckpt import CheckpointConfigError, CheckpointCorruptError, CheckpointNotFoundError, CheckpointSaveError, SharingPattern, StateComponent
from async_ckpt.trainer import Trainer, TrainingArguments
from async_ckpt.trainer.checkpoint_types import StateComponent as GuideStateComponent
from tests.distributed.trainer_child import RegressionData, StopTrainer, new_model

pytestmark = pytest.mark.timeout(60)

GUIDE_FILES = ["checkpoint_manifest.json", "dataset_state.pt", "model.safetensors", "optimizer_state.pt", "rng_state.pt", "scheduler_state.pt", "trainer_state.pt"]


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    options = dict(output_dir=str(out), max_steps=20, per_device_train_batch_size=4, save_steps=5, learning_rate=1e-2, logging_steps=0)
    options.update(overrides)
    return TrainingArguments(**options)


def _train(out: Path, cls: type = Trainer, seed: int = 0, **overrides: Any) -> Any:
    trainer = cls(model=new_model(seed), args=_args(out, **overrides), train_dataset=RegressionData())
    return trainer, trainer.train()


def test_files_match_the_guide_and_retention_keeps_the_newest(tmp_path: Path) -> None:
    trainer, output = _train(tmp_path, max_steps=30, save_total_limit=3)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-25", "checkpoint-30"]
    assert output.last_checkpoint == tmp_path / "checkpoint-30"
    assert sorted(p.name for p in (tmp_path / "checkpoint-30").iterdir()) == GUIDE_FILES
    manifest = json.loads((tmp_path / "checkpoint-30" / "checkpoint_manifest.json").read_text())
    assert {k: v["sharing_pattern"] for k, v in manifest["components"].items()} == {
        "model": "global", "optimizer": "global", "scheduler": "global", "trainer": "global", "dataset": "global", "rng": "per_rank"
    }
    weights = safetensors.torch.load_file(tmp_path / "checkpoint-30" / "model.safetensors")
    assert weights.keys() == trainer.model.state_dict().keys()  # no wrapper prefix
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    progress = torch.load(tmp_path / "checkpoint-30" / "trainer_state.pt", weights_only=True)
    assert progress == {"global_step": 30, "epoch": 2, "steps_in_epoch": 10, "samples_seen": 120}


def test_save_safetensors_false_writes_model_pt(tmp_path: Path) -> None:
    trainer, _ = _train(tmp_path, max_steps=5, save_safetensors=False)
    files = sorted(p.name for p in (tmp_path / "checkpoint-5").iterdir())
    assert "model.pt" in files and "model.safetensors" not in files
    state = torch.load(tmp_path / "checkpoint-5" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in trainer.model.state_dict().items())


def test_epochs_and_strategies(tmp_path: Path) -> None:
    _, output = _train(tmp_path / "epochs", max_steps=-1, num_train_epochs=2, save_strategy="epoch")
    assert output.global_step == 20
    assert sorted(p.name for p in (tmp_path / "epochs").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    _, output = _train(tmp_path / "none", save_strategy="no")
    assert output.last_checkpoint is None and not any((tmp_path / "none").glob("checkpoint-*"))


def test_resume_true_without_checkpoint_starts_fresh_and_false_ignores_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt.trainer")
    _, first = _train(tmp_path, max_steps=10)
    assert first.resumed_from is None and "no committed checkpoint" in caplog.text
    with pytest.raises(CheckpointConfigError, match=r"resume_from_checkpoint=False, but .* holds checkpoints .*overwrite_output_dir=True"):
        _train(tmp_path, max_steps=10, resume_from_checkpoint=False)
    assert (tmp_path / "checkpoint-10").is_dir()  # refused before anything was touched
    _, again = _train(tmp_path, max_steps=5, save_steps=5, resume_from_checkpoint=False, overwrite_output_dir=True)
    assert again.resumed_from is None and again.steps_this_run == 5
    assert "deleting the 2 checkpoint(s) of the previous run" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]  # the old run's 10 is gone
    with pytest.raises(CheckpointNotFoundError):
        _train(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-999"))


def test_partial_resume_skips_deleted_components_with_a_warning_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _train(tmp_path, max_steps=10)
    for name in ("optimizer_state.pt", "scheduler_state.pt", "rng_state.pt"):
        (tmp_path / "checkpoint-10" / name).unlink()
    caplog.set_level(logging.INFO, logger="async_ckpt")
    trainer = Trainer(model=new_model(7), args=_args(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-10")), train_dataset=RegressionData())
    output = trainer.train()
    assert output.resumed_from == tmp_path / "checkpoint-10" and output.steps_this_run == 10
    assert output.skipped_components == ["optimizer", "rng", "scheduler"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("async_ckpt.trainer")]
    assert len(warned) == 3 and all("not restored" in w for w in warned)
    summary = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert summary and "loaded=['model', 'trainer', 'dataset']" in summary[0] and "failed=[]" in summary[0]


def test_the_model_cannot_be_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _train(tmp_path, max_steps=5)
    (tmp_path / "checkpoint-5" / "model.safetensors").unlink()
    with pytest.raises(CheckpointCorruptError, match="required component 'model'"):
        _train(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert "resume failed" in caplog.text


class Counter:
    """A custom Stateful, as in the guide's "Custom Checkpoint Components"."""

    def __init__(self, fail_on: tuple[int, ...] = ()) -> None:
        self.count = 0
        self.fail_on = fail_on
        self.calls = 0

    def state_dict(self) -> dict[str, int]:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected failure in state_dict call {self.calls}")
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


class CustomTrainer(StopTrainer):
    fail_on: tuple[int, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.my_custom_state = Counter(self.fail_on)

    def training_step(self, batch: Any) -> torch.Tensor:
        self.my_custom_state.count += 1
        return super().training_step(batch)

    def get_state_components(self) -> list[StateComponent]:
        components = super().get_state_components()
        if hasattr(self, "my_custom_state"):
            components.append(GuideStateComponent(key="custom", stateful=self.my_custom_state, sharing_pattern=SharingPattern.GLOBAL, required=False))
        return components


def test_custom_components_are_saved_and_restored(tmp_path: Path) -> None:
    _train(tmp_path, cls=CustomTrainer, max_steps=8)
    assert (tmp_path / "checkpoint-8" / "custom_state.pt").exists()
    trainer, output = _train(tmp_path, cls=CustomTrainer, max_steps=12)
    assert output.resumed_from == tmp_path / "checkpoint-8" and trainer.my_custom_state.count == 12


def test_a_failed_save_is_logged_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(CustomTrainer):
        fail_on = (2,)  # call 1: the buffers allocated after step 1; call 2: the first save (step 5) fails

    trainer, output = _train(tmp_path, cls=Flaky, max_steps=15)
    assert output.global_step == 15 and output.last_checkpoint == tmp_path / "checkpoint-15"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-15"]
    failures = [r.getMessage() for r in caplog.records if "checkpoint save failed, training goes on" in r.getMessage()]
    assert len(failures) == 1 and "step 5" in failures[0] and "injected failure" in failures[0]


def test_a_failed_final_save_raises(tmp_path: Path) -> None:
    class FailsLast(CustomTrainer):
        fail_on = (3,)  # call 1: buffers allocated after step 1; step 5 commits; the final save (step 7) fails

    with pytest.raises(CheckpointSaveError, match="injected failure"):
        _train(tmp_path, cls=FailsLast, max_steps=7)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]


def test_compute_loss_for_tuple_batches_and_a_clear_error_without_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, generator=g))

    def mse(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return model(x, y)["loss"]

    trainer = Trainer(model=new_model(), args=_args(tmp_path / "a", max_steps=6), train_dataset=data, compute_loss=mse)
    assert trainer.train().global_step == 6
    with pytest.raises(TypeError, match="pass compute_loss=fn"):
        Trainer(model=new_model(), args=_args(tmp_path / "b", max_steps=2), train_dataset=data).train()


def test_a_plain_dataloader_has_no_dataset_component(tmp_path: Path) -> None:
    loader = DataLoader(RegressionData(), batch_size=4, shuffle=True)
    trainer = Trainer(model=new_model(), args=_args(tmp_path, max_steps=5), train_dataloader=loader)
    trainer.train()
    assert "dataset_state.pt" not in {p.name for p in (tmp_path / "checkpoint-5").iterdir()}
    assert [c.key for c in trainer.get_state_components()] == ["model", "optimizer", "scheduler", "trainer", "rng"]


def test_skipping_busy_saves_never_skips_the_final_one(tmp_path: Path) -> None:
    trainer, output = _train(tmp_path, max_steps=12, save_steps=1, save_on_busy="skip", save_total_limit=2)
    assert output.last_checkpoint == tmp_path / "checkpoint-12"
    assert (tmp_path / "checkpoint-12" / "checkpoint_manifest.json").exists()
    steps = [step for step, _ in trainer.save_stalls]
    assert steps[:12] == list(range(1, 13)) and steps[12:] in ([], [12]), "a skipped step-12 save is redone by the final save"


def test_buffers_are_allocated_after_the_first_step_not_in_the_first_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first save copies into buffers allocated before it (as every later one does)."""
    from async_ckpt import CheckpointManager

    allocated_by_save = []
    real_save = CheckpointManager.save

    def save(self: CheckpointManager, step: int, **kwargs: Any) -> Any:
        before = self._pool.stats.allocations
        handle = real_save(self, step, **kwargs)
        allocated_by_save.append(self._pool.stats.allocations - before)
        return handle

    monkeypatch.setattr(CheckpointManager, "save", save)
    trainer, _ = _train(tmp_path, max_steps=10)
    assert trainer.checkpoint_manager._pool.stats.allocations > 0
    assert allocated_by_save == [0, 0], "prepare() after step 1 allocated every buffer; no save allocates"
    idle, _ = _train(tmp_path / "nosave", max_steps=3, save_strategy="no")
    assert idle.checkpoint_manager._pool.stats.allocations == 0, "no saves planned: no buffers"


def test_a_state_dict_failing_when_buffers_are_allocated_is_logged_and_the_saves_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class FailsEarly(CustomTrainer):
        fail_on = (1,)  # call 1: the buffers allocated after step 1

    _, output = _train(tmp_path, cls=FailsEarly, max_steps=10)
    assert output.last_checkpoint == tmp_path / "checkpoint-10" and (tmp_path / "checkpoint-5").is_dir()
    assert any("could not allocate the staging buffers ahead of the first save" in r.getMessage() and "injected failure" in r.getMessage() for r in caplog.records)
