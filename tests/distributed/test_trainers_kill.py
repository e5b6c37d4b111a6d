"""A Trainer killed with SIGKILL during a background save resumes by itself on restart.

The child (``tests.distributed.trainer_child``) saves ~18 MiB every step, so a save is nearly
always being written; the test kills it while a ``.checkpoint-*.staging-*`` directory exists,
then starts the same command again and checks where it resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from async_ckpt.layout import list_committed, list_leftovers

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _start(out: Path, max_steps: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    with open(log, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", "tests.distributed.trainer_child", str(out), str(max_steps)], stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)


def _step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True)["global_step"]


@pytest.mark.timeout(120)
def test_sigkill_during_a_background_save_resumes_from_the_newest_committed(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "child.log"
    for _attempt in range(3):  # the kill must land while a save is being written
        proc = _start(out, 10_000, log)
        _wait_for(lambda: len(list_committed(out)) >= 2 and any(l.kind == "staging" for l in list_leftovers(out)), proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if any(l.kind == "staging" for l in list_leftovers(out)):
            break
    else:
        pytest.fail("could not kill the child during a save in 3 attempts")
    committed = list_committed(out)
    newest = committed[-1][0]
    for step, path in committed:
        assert _step_of(path) == step, f"{path.name} holds trainer_state step {_step_of(path)}"

    proc = _start(out, newest + 2, log)  # the same command again: no flag to say "resume"
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    summary = [l for l in lines if "resumed from" in l]
    assert len(summary) == 1 and f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in summary[0], lines[:10]
    assert "failed=[]" in summary[0] and "skipped=[]" in summary[0]
    assert [l for l in lines if l.startswith("step ")] == [f"step {newest + 1}", f"step {newest + 2}"], "the restart trains only the remaining steps"
    assert f"done {newest + 2}" in lines
    assert not list_leftovers(out), "the restart removes what the killed save left behind"
    assert _step_of(out / f"checkpoint-{newest + 2}") == newest + 2
