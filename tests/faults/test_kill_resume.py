"""SIGKILL a saving process at random moments; every restart resumes from a good checkpoint.

Each round starts ``kill_child`` (which resumes by itself and then saves every step), kills it
with SIGKILL after a random delay, and checks from outside that the newest committed checkpoint
loads, verifies, and holds exactly the state of its step. 20 kills run by default; the slow
variant runs 200 (``make test-full``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from async_ckpt import CheckpointManager
from async_ckpt.layout import list_committed, list_leftovers
from tests.faults.kill_child import StepState, components

ROOT = Path(__file__).resolve().parents[2]


def _start(out: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.kill_child", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read()}")
    return proc, int(line.split()[1])


def _check_newest(out: Path) -> int:
    """Load the newest committed checkpoint into fresh objects and check it is exactly its step."""
    state, model = StepState(), torch.nn.Linear(64, 64)
    with CheckpointManager(out, components(state, model)) as manager:
        assert not list_leftovers(out), "a new manager must remove every staging leftover"
        result = manager.load()
    if result is None:
        return 0
    step = result.step
    assert result.path.name == f"checkpoint-{step}" and state.step == step
    assert torch.equal(state.big, torch.full_like(state.big, step))
    assert torch.equal(state.small, torch.full_like(state.small, step))
    assert all(torch.equal(p, torch.full_like(p, step)) for p in model.parameters())
    return step


def _kill_rounds(out: Path, rounds: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    steps = []
    previous = 0
    for _ in range(rounds):
        proc, resumed_at = _start(out)
        assert resumed_at == previous, "the child must resume from the newest committed checkpoint"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
        newest = _check_newest(out)
        assert newest >= previous, "a committed checkpoint was lost"
        assert len(list_committed(out)) <= 3 + 1, "retention left too many checkpoints"
        steps.append(newest)
        previous = newest
    return steps


@pytest.mark.timeout(600)
def test_twenty_random_kills_always_resume_from_a_good_checkpoint(tmp_path: Path) -> None:
    steps = _kill_rounds(tmp_path / "run", 20, seed=1234)
    assert steps[-1] > 0, f"no save ever committed: {steps}"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_hundred_random_kills(tmp_path: Path) -> None:
    steps = _kill_rounds(tmp_path / "run", 200, seed=int(os.environ.get("ASYNC_CKPT_SEED", "99")))
    assert steps[-1] > 0
