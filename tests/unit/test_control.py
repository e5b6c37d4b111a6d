"""The control file, the stop decision table, ``async-ckpt ctl``, and a Trainer steered by the file."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.cli import main as cli_main
from async_ckpt.layout import list_committed
from async_ckpt.trainer import Trainer, TrainingArguments
from async_ckpt.trainer.control import (
    CONTROL_FILE, NONE, SAVE, SAVE_AND_STOP, STOP, Decision, StepBoundary, decide, parse_command, take_command, write_command,
)
from async_ckpt.trainer.signals import SignalWatcher
from tests.distributed.trainer_child import RegressionData, new_model

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("text, code", [
    ("save", SAVE), (" Save\n", SAVE), ("stop", STOP), ("save-and-stop", SAVE_AND_STOP), ("save_and_stop\n", SAVE_AND_STOP),
    ('{"command": "stop"}', STOP), ('{"command": "save-and-stop", "by": "me"}', SAVE_AND_STOP),
])
def test_commands_parse(text: str, code: int) -> None:
    assert parse_command(text) == code


@pytest.mark.parametrize("text", ["", "halt", '{"cmd": "stop"}', "{not json", '["stop"]', '{"command": 3}'])
def test_bad_commands_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="save, stop, save-and-stop|JSON object"):
        parse_command(text)


def test_write_then_take_consumes_the_file(tmp_path: Path) -> None:
    assert take_command(tmp_path) == NONE and take_command(tmp_path / "missing") == NONE
    path = write_command(tmp_path, "save-and-stop")
    assert path == tmp_path / CONTROL_FILE and path.read_text() == "save-and-stop\n"
    write_command(tmp_path, "save")  # a request not yet taken is replaced
    assert take_command(tmp_path) == SAVE
    assert take_command(tmp_path) == NONE and sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write_command(tmp_path, "reboot")


def test_a_bad_file_is_removed_with_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CONTROL_FILE).write_text("please stop\n")
    assert take_command(tmp_path) == NONE
    assert not (tmp_path / CONTROL_FILE).exists() and "ignoring the control file" in caplog.text and "unknown command" in caplog.text


# signal code, control code, save_on_interrupt, save_strategy -> save, stop, reason, exit code
DECISIONS = [
    (0, NONE, None, "steps", False, False, None, 0),
    (0, SAVE, None, "steps", True, False, "save", 0),
    (0, STOP, None, "steps", False, True, "stop", 0),
    (0, SAVE_AND_STOP, None, "no", True, True, "save-and-stop", 0),
    (2, NONE, None, "steps", True, True, "SIGTERM", 143),
    (2, NONE, None, "no", False, True, "SIGTERM", 143),
    (2, NONE, False, "steps", False, True, "SIGTERM", 143),
    (1, NONE, None, "steps", False, True, "SIGINT", 130),
    (1, NONE, True, "steps", True, True, "SIGINT", 130),
    (1, SAVE_AND_STOP, False, "steps", True, True, "SIGINT", 130),
]


@pytest.mark.parametrize("sig, control, on_interrupt, strategy, save, stop, reason, code", DECISIONS)
def test_decision_table(sig: int, control: int, on_interrupt: Any, strategy: str, save: bool, stop: bool, reason: Any, code: int) -> None:
    got = decide(sig, control, 0.0, save_on_interrupt=on_interrupt, save_strategy=strategy, grace_s=None, now=100.0)
    assert (got.save, got.stop, got.reason, got.exit_code, got.deadline) == (save, stop, reason, code, None)


def test_the_grace_deadline_counts_from_the_earliest_signal() -> None:
    got = decide(2, NONE, 3.0, save_on_interrupt=None, save_strategy="steps", grace_s=30.0, now=100.0)
    assert got.deadline == 127.0
    assert decide(0, STOP, 0.0, save_on_interrupt=None, save_strategy="steps", grace_s=30.0, now=100.0).deadline is None


def test_one_process_polls_the_file_at_most_every_control_poll_s(tmp_path: Path) -> None:
    def boundary(poll_s: Any) -> StepBoundary:
        args = TrainingArguments(output_dir=str(tmp_path), control_poll_s=poll_s)
        return StepBoundary(SignalWatcher(enabled=False), args, rank=0, world_size=1, group=None)

    never, slow = boundary(None), boundary(3600)
    write_command(tmp_path, "save")
    assert never.poll(1) == Decision() and (tmp_path / CONTROL_FILE).exists()
    assert slow.poll(1) == Decision(save=True, reason="save")
    write_command(tmp_path, "stop")
    assert slow.poll(2) == Decision(), "looked less than control_poll_s ago"
    assert boundary(0).poll(3) == Decision(stop=True, reason="stop")
    assert StepBoundary(SignalWatcher(enabled=False), TrainingArguments(output_dir=str(tmp_path)), rank=0, world_size=1, group=None).all_agree(False) is False


@pytest.mark.parametrize("field, value", [
    ("save_on_interrupt", "yes"), ("save_on_interrupt", 1), ("interrupt_grace_s", -1), ("control_poll_s", "1"),
    ("handle_signals", None), ("exit_on_interrupt", 0),
])
def test_bad_arguments_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TrainingArguments(**{field: value})


# --------------------------------------------------------------------------------------- ctl


def test_ctl_writes_the_request(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["ctl", str(tmp_path), "save-and-stop"]) == 0
    assert (tmp_path / CONTROL_FILE).read_text() == "save-and-stop\n"
    assert "requested save-and-stop" in capsys.readouterr().out
    assert cli_main(["ctl", str(tmp_path / "nope"), "stop"]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["ctl", str(tmp_path), "stop", "--wait", "0.1"]) == 1, "nobody takes it"
    assert "not taken after 0.1 s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli_main(["ctl", str(tmp_path), "reboot"])
    assert usage.value.code == 2


# ------------------------------------------------------------------------------- a real Trainer


class Commanding(Trainer):
    """Writes ``command`` into its own output_dir during step ``at``, as ``async-ckpt ctl`` would."""

    at = 0
    command = "save"

    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)
        if self.state.global_step + 1 == self.at:
            write_command(self.args.output_dir, self.command)
        return loss


def _run(out: Path, command: str, at: int) -> Any:
    args = TrainingArguments(output_dir=str(out), max_steps=20, per_device_train_batch_size=4, save_steps=7, logging_steps=0, control_poll_s=0)
    trainer = Commanding(model=new_model(), args=args, train_dataset=RegressionData())
    trainer.at, trainer.command = at, command
    return trainer.train()


@pytest.mark.parametrize("command, steps, stopped_at, reason", [
    ("save", [5, 7, 14, 20], 20, None), ("save-and-stop", [5], 5, "save-and-stop"), ("stop", [], 5, "stop"),
])
def test_a_trainer_acts_on_the_file_at_the_next_step_boundary(tmp_path: Path, command: str, steps: list[int], stopped_at: int, reason: Any) -> None:
    output = _run(tmp_path, command, 5)
    assert [s for s, _ in list_committed(tmp_path)] == steps
    assert (output.global_step, output.stop_reason, output.exit_code) == (stopped_at, reason, 0)
    assert not (tmp_path / CONTROL_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_trainer_logs_the_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    _run(tmp_path, "save-and-stop", 3)
    assert "[rank 0 step 3] control file: save-and-stop" in caplog.text
