"""One job per run directory, with real processes: a second job is refused, a SIGKILLed owner is
taken over, a requeued job waits for its draining predecessor, an unwritable directory is refused
at construction, and a save that clearly cannot fit is refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from async_ckpt import CheckpointDirectoryError, CheckpointLockError, CheckpointManager, CheckpointSpaceError
from async_ckpt.layout import list_committed, list_leftovers
from async_ckpt.ownership import read_holder
from tests.faults.owner_child import Blob, components

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def _start(out: Path, steps: int, pause_s: float, env: dict | None = None) -> subprocess.Popen:
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.owner_child", str(out), str(steps), str(pause_s)],
                            cwd=ROOT, env=child_env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready "), line
    return proc


def _check_all(out: Path, steps: list[int]) -> None:
    """Every committed checkpoint loads and holds its step."""
    assert [s for s, _ in list_committed(out)] == steps
    blob = Blob()
    with CheckpointManager(out, components(blob), lock_timeout_s=10) as mgr:
        for step, path in list_committed(out):
            mgr.load(path)
            assert torch.equal(blob.data, torch.full((1 << 16,), float(step)))


def test_a_second_job_is_refused_within_its_timeout_and_the_first_commits_everything(tmp_path):
    out = tmp_path / "run"
    first = _start(out, 6, 0.3)
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointLockError, match=rf"owned by host \S+, pid {first.pid}, since .*close\(\)|owned by host \S+, pid {first.pid}"):
            CheckpointManager(out, components(Blob()), lock_timeout_s=1.0)
        assert time.monotonic() - started < 30  # refused at its timeout, not after the first job
        assert first.poll() is None, "the first job was disturbed"
        assert first.wait(120) == 0
    finally:
        first.kill()
    _check_all(out, [1, 2, 3, 4, 5, 6])


def test_a_job_sigkilled_mid_save_is_taken_over_and_the_successor_commits(tmp_path):
    out = tmp_path / "run"
    owner = _start(out, 3, 0.0, {"ASYNC_CKPT_FAULTS": "mid_write:stall", "ASYNC_CKPT_STALL_S": "3600"})
    deadline = time.monotonic() + 60
    while not any(left.kind == "staging" for left in list_leftovers(out)):  # mid-save
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(30)
    assert read_holder(out).pid == owner.pid and not read_holder(out).released
    started = time.monotonic()
    blob = Blob()
    with CheckpointManager(out, components(blob), lock_timeout_s=60) as mgr:
        took = time.monotonic() - started
        assert took < 10, f"same host: the kernel released the lock at the kill, takeover took {took:.1f} s"
        assert read_holder(out).pid == os.getpid()
        assert list_leftovers(out) == []  # the dead job's staging directory
        blob.data.fill_(7)
        assert mgr.save(7).wait() == out / "checkpoint-7"
    _check_all(out, [7])


def test_a_requeued_job_waits_for_its_draining_predecessor_then_proceeds(tmp_path):
    out = tmp_path / "run"
    # The predecessor's last save stalls 3 s before it publishes: its close() drains it.
    predecessor = _start(out, 2, 0.5, {"ASYNC_CKPT_FAULTS": "before_publish:stall", "ASYNC_CKPT_STALL_S": "3"})
    blob = Blob()
    with CheckpointManager(out, components(blob), lock_timeout_s=60) as mgr:
        assert predecessor.wait(5) == 0  # it had ended (released) before construction returned
        assert [s for s, _ in list_committed(out)] == [1, 2]
        result = mgr.load()
        assert result.step == 2 and torch.equal(blob.data, torch.full((1 << 16,), 2.0))
        blob.data.fill_(3)
        assert mgr.save(3).wait() == out / "checkpoint-3"
    _check_all(out, [1, 2, 3])


def _mount(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")


@pytest.mark.parametrize("sub", ["", "new/run"])
def test_a_read_only_output_dir_is_refused_at_construction(tmp_path, sub):
    mount = tmp_path / "ro"
    _mount(mount, "ro,size=1m")
    try:
        with pytest.raises(CheckpointDirectoryError, match=rf"{mount}.*(Read-only|read-only)"):
            CheckpointManager(mount / sub if sub else mount, components(Blob()))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_output_dir_through_a_file_is_refused_at_construction(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointDirectoryError, match="a file is in the way"):
        CheckpointManager(tmp_path / "afile" / "run", components(Blob()))


class Big:
    def __init__(self) -> None:
        self.data = torch.zeros(3 << 20, dtype=torch.uint8)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data.copy_(state["data"])


def test_a_save_that_clearly_cannot_fit_is_refused_before_writing(tmp_path):
    from async_ckpt import StateComponent

    out = tmp_path / "small"
    _mount(out, "size=8m")
    try:
        big = Big()
        with CheckpointManager(out, [StateComponent("model", big, required=True)]) as mgr:
            mgr.save(1).wait()
            filler = out / "filler"
            free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
            filler.write_bytes(b"\0" * (free - (1 << 20)))  # 1 MiB left, the checkpoint takes 3 MiB
            with pytest.raises(CheckpointSpaceError, match="not enough free space.*nothing was written"):
                mgr.save(2).wait()
            assert list_leftovers(out) == []
            filler.unlink()
            assert mgr.save(3).wait() == out / "checkpoint-3"
        assert [s for s, _ in list_committed(out)] == [1, 3]
    finally:
        subprocess.run(["umount", str(out)], check=False)
