"""Draining at ``close(timeout)`` and at interpreter exit: bounded, and every save accounted for.

The checkpoint threads are ``ThreadPoolExecutor`` threads, not daemon threads: Python joins them
at exit. The manager's exit hook runs before that join, waits (bounded) for the saves of a
manager nobody closed, and logs each one's end; a subprocess shows it with a save held in flight.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointTimeoutError, StateComponent, faults
from async_ckpt.layout import list_committed

pytestmark = [pytest.mark.timeout(60), pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import logging, sys, time
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
import torch
from async_ckpt import CheckpointManager, StateComponent, faults
faults.arm("before_report", lambda point, rank: time.sleep(1.0))
manager = CheckpointManager(sys.argv[1], [StateComponent("model", torch.nn.Linear(4, 4), required=True)])
manager.save(1)
print("main done", flush=True)
"""


def test_exit_without_close_waits_for_the_save_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("async_ckpt.rundir")]  # the free-space line at start
    assert lines[0] == "main done"
    assert "exiting without CheckpointManager.close(): waiting up to" in lines[1] and lines[1].endswith("1 save(s) in flight: step 1")
    assert any("[rank 0 step 1] at exit: committed" in line for line in lines[2:]), done.stdout
    assert [step for step, _ in list_committed(tmp_path)] == [1]


@pytest.fixture
def held() -> threading.Event:
    """Holds every save at ``before_report`` until the event is set."""
    release = threading.Event()
    faults.arm("before_report", lambda point, rank: release.wait(10))
    yield release
    release.set()
    faults.disarm()


def test_close_with_a_timeout_gives_up_logs_and_raises(tmp_path: Path, held: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="async_ckpt")
    manager = CheckpointManager(tmp_path, [StateComponent("model", torch.nn.Linear(4, 4), required=True)])
    handle = manager.save(3)
    started = time.monotonic()
    with pytest.raises(CheckpointTimeoutError, match="step 3.*still running after 0.2s"):
        manager.close(timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert "closing: waiting for 1 save(s) in flight: step 3" in caplog.text
    assert "[rank 0 step 3] closing: gave up after" in caplog.text and "not committed" in caplog.text
    manager.close()  # closed: a no-op
    held.set()
    assert handle.wait(10) == tmp_path / "checkpoint-3", "the save given up on still ends by itself"


def test_close_logs_the_saves_it_waited_for(tmp_path: Path, held: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="async_ckpt")
    manager = CheckpointManager(tmp_path, [StateComponent("model", torch.nn.Linear(4, 4), required=True)])
    manager.save(4)
    threading.Timer(0.2, held.set).start()
    manager.close(timeout=10)
    assert "closing: waiting for 1 save(s) in flight: step 4" in caplog.text
    assert f"[rank 0 step 4] closing: committed {tmp_path / 'checkpoint-4'} after waiting" in caplog.text


WORKERS_CHILD = """
import logging, sys, time
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from async_ckpt.trainer import Trainer, TrainingArguments
from tests.distributed.trainer_child import RegressionData, new_model

class Slow(Trainer):
    def training_step(self, batch):
        loss = super().training_step(batch)
        time.sleep(0.02)
        print("step", self.state.global_step + 1, flush=True)
        return loss

args = TrainingArguments(output_dir=sys.argv[1], max_steps=10_000, per_device_train_batch_size=4, save_steps=7, logging_steps=0,
                         dataloader_num_workers=2, save_on_interrupt=True)
Slow(model=new_model(), args=args, train_dataset=RegressionData()).train()
"""


def test_ctrl_c_to_the_whole_process_group_with_dataloader_workers(tmp_path: Path) -> None:
    """A terminal's Ctrl+C reaches the forked DataLoader workers too: they ignore it, the trainer stops."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    log = tmp_path / "child.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", WORKERS_CHILD, str(tmp_path / "run")], stdout=sink, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while "step 12\n" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("SIGINT: stopping at the next step boundary") == 1, "only the trainer process takes note"
    stopped = int(re.search(r"\[rank 0 step (\d+)\] stopping for SIGINT", text).group(1))  # type: ignore[union-attr]
    assert [step for step, _ in list_committed(tmp_path / "run")][-1] == stopped, text[-3000:]
