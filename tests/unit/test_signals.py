"""SIGINT and SIGTERM in one process: the watcher's rules, and a Trainer stopped by a real signal.

The signals are real (``os.kill`` of this process); the watcher's handlers are installed only
inside ``with SignalWatcher()`` or ``train()``, so pytest's own handlers are back afterwards.
Runs that would leave a save running at exit (an abort) live in subprocess tests only.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.layout import list_committed
from async_ckpt.trainer import Trainer, TrainingArguments, TrainingInterrupted
from async_ckpt.trainer.signals import REPEAT_WINDOW_S, SignalWatcher, exit_code
from tests.distributed.trainer_child import RegressionData, assert_bitwise_equal, new_model, state_of

pytestmark = pytest.mark.timeout(60)

TOTAL = 30


def test_exit_codes_follow_the_shell_convention() -> None:
    assert (exit_code(signal.SIGINT), exit_code(signal.SIGTERM)) == (130, 143)
    assert issubclass(TrainingInterrupted, SystemExit) and TrainingInterrupted(143, None).code == 143  # type: ignore[arg-type]


def test_handlers_are_installed_for_the_block_only() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with SignalWatcher() as watcher:
        assert watcher.installed and all(signal.getsignal(s) == watcher._handle for s in before)
    assert {s: signal.getsignal(s) for s in before} == before
    with SignalWatcher(enabled=False) as watcher:
        assert not watcher.installed and {s: signal.getsignal(s) for s in before} == before


def test_off_the_main_thread_nothing_is_installed(caplog: pytest.LogCaptureFixture) -> None:
    seen = []
    caplog.set_level(logging.INFO)
    thread = threading.Thread(target=lambda: seen.append(SignalWatcher().__enter__().installed))
    thread.start()
    thread.join()
    assert seen == [False] and "outside the main thread" in caplog.text


def test_the_first_signal_is_noted_and_a_repeat_within_the_window_is_the_same_request() -> None:
    with SignalWatcher() as watcher:
        assert watcher.request() == (0, 0.0)
        os.kill(os.getpid(), signal.SIGINT)
        code, elapsed = watcher.request()
        assert code == 1 and 0 <= elapsed < REPEAT_WINDOW_S
        os.kill(os.getpid(), signal.SIGINT)  # forwarded twice (terminal and torchrun): no abort
        assert not watcher.aborted
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.request()[0] == 2, "SIGTERM outranks SIGINT"


def test_sigterm_again_never_aborts_and_a_later_sigint_does() -> None:
    with SignalWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGTERM)
        watcher.first_at -= 5  # type: ignore[operator]
        os.kill(os.getpid(), signal.SIGTERM)
        assert not watcher.aborted and watcher.request()[0] == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                pass
        assert watcher.aborted


# ------------------------------------------------------------------------------- a real Trainer


class SignalAt(Trainer):
    """Sends ``signum`` to this process during step ``at`` (with ``settle``: once no save is in flight)."""

    at: int | None = None
    signum = signal.SIGTERM
    settle = False
    steps_run = 0

    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)
        self.steps_run += 1
        if self.state.global_step + 1 == self.at:
            if self.settle:
                self.checkpoint_manager.wait()  # type: ignore[union-attr]
            os.kill(os.getpid(), self.signum)
        return loss


def _trainer(out: Path, at: int | None = None, signum: int = signal.SIGTERM, fresh: bool = True, settle: bool = False, **overrides: Any) -> SignalAt:
    options = dict(output_dir=str(out), max_steps=TOTAL, per_device_train_batch_size=4, save_steps=7, learning_rate=1e-2, logging_steps=0)
    options.update(overrides)
    trainer = SignalAt(model=new_model(seed=0 if fresh else 99), args=TrainingArguments(**options), train_dataset=RegressionData())
    trainer.at, trainer.signum, trainer.settle = at, signum, settle
    return trainer


def _steps(out: Path) -> list[int]:
    return [step for step, _ in list_committed(out)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> SignalAt:
    trainer = _trainer(tmp_path_factory.mktemp("straight") / "run")
    trainer.train()
    return trainer


@pytest.mark.parametrize("at", [11, 14], ids=["between-saves", "on-a-save-step"])
def test_sigterm_saves_the_step_raises_143_and_the_restart_resumes_bitwise(straight: SignalAt, tmp_path: Path, at: int) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        _trainer(out, at).train()
    assert stopped.value.code == 143
    output = stopped.value.output
    assert (output.global_step, output.stop_reason, output.exit_code) == (at, "SIGTERM", 143)
    assert output.last_checkpoint == out / f"checkpoint-{at}" and _steps(out)[-1] == at
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "train() put the previous handler back"
    resumed = _trainer(out, fresh=False)
    result = resumed.train()
    assert result.resumed_from == out / f"checkpoint-{at}" and resumed.steps_run == TOTAL - at
    assert_bitwise_equal(state_of(straight.model, straight.optimizer), state_of(resumed.model, resumed.optimizer))


def test_sigint_does_not_save_by_default_and_can_return_instead_of_exiting(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "run", 10, signal.SIGINT, exit_on_interrupt=False)
    output = trainer.train()
    assert (output.global_step, output.stop_reason, output.exit_code, trainer.exit_code) == (10, "SIGINT", 130, 130)
    assert _steps(tmp_path / "run") == [7], "the save in flight committed; SIGINT takes no extra save unless asked"


def test_save_on_interrupt_true_saves_for_sigint_and_false_never_saves(tmp_path: Path) -> None:
    with pytest.raises(TrainingInterrupted) as stopped:
        _trainer(tmp_path / "yes", 10, signal.SIGINT, save_on_interrupt=True).train()
    assert stopped.value.code == 130 and _steps(tmp_path / "yes") == [7, 10]
    with pytest.raises(TrainingInterrupted):
        _trainer(tmp_path / "no", 10, save_on_interrupt=False).train()
    assert _steps(tmp_path / "no") == [7]


def test_a_final_save_that_cannot_fit_the_grace_budget_is_skipped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    with pytest.raises(TrainingInterrupted) as stopped:
        _trainer(tmp_path / "run", 10, settle=True, interrupt_grace_s=0).train()  # settled: nothing is left running
    assert stopped.value.code == 143 and _steps(tmp_path / "run") == [7]
    assert "skipping the final save: it would not commit within interrupt_grace_s (estimated " in caplog.text
    with pytest.raises(TrainingInterrupted):
        _trainer(tmp_path / "roomy", 10, settle=True, interrupt_grace_s=60).train()
    assert _steps(tmp_path / "roomy") == [7, 10]


def test_handle_signals_false_leaves_the_handlers_alone(tmp_path: Path) -> None:
    seen = []

    class Probe(Trainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            seen.append(signal.getsignal(signal.SIGINT))
            return super().training_step(batch)

    before = signal.getsignal(signal.SIGINT)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=0, handle_signals=False)
    Probe(model=new_model(), args=args, train_dataset=RegressionData()).train()
    assert seen == [before, before]
