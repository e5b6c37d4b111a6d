"""SIGKILL at the run-directory points a job saving steps 1, 2, 3 ... never reaches: a re-save
of a step (``mid_replace``) and start-up recovery (``mid_recover``). Real processes, real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ckpt import CheckpointManager, faults
from async_ckpt.layout import list_committed, list_leftovers
from tests.faults.owner_child import Blob, components
from tests.faults.scenario import newest_good, start_manager_cleans, train
from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def _resave_killed(rank: int, world: int, out: str) -> None:
    blob = Blob()
    manager = CheckpointManager(out, components(blob))
    for step in (1, 2):
        blob.data.fill_(step)
        manager.save(step).wait()
    blob.data.fill_(100)  # a rewind: step 1 again, other content
    faults.arm("mid_replace", "kill")
    manager.save(1).wait()


def _read(rank: int, world: int, out: str, path: str) -> float:
    blob = Blob()
    with CheckpointManager(out, components(blob)) as manager:
        manager.load(path)
    return float(blob.data[0])


def test_a_kill_mid_replace_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (outcome,) = run_ranks_expect(_resave_killed, 1, str(out))
    assert outcome[:2] == ("error", "ProcessDied")
    assert [s for s, _ in list_committed(out)] == [2]  # checkpoint-1 is renamed aside for a moment
    assert {left.kind for left in list_leftovers(out)} == {"replaced", "staging"}
    assert run_ranks(_read, 1, str(out), str(out / "checkpoint-1")) == [1.0]  # restored at start: the old one
    assert list_leftovers(out) == []


def test_a_kill_mid_recovery_is_finished_by_the_next_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_ranks_expect(train, 1, str(out), 4, ("before_publish", "kill", 0, 3), 2.0, 1)
    run_ranks_expect(train, 1, str(out), 4, ("mid_delete", "kill", 0, 3), 2.0, 1)  # a deleting leftover too
    assert len(list_leftovers(out)) >= 1
    before = newest_good(out, 1)
    outcomes = run_ranks_expect(train, 1, str(out), 1, None, 2.0, 1, env={"ASYNC_CKPT_FAULTS": "mid_recover:kill"})
    assert outcomes[0][:2] == ("error", "ProcessDied")
    assert newest_good(out, 1) == before
    start_manager_cleans(out)
    (resumed,) = run_ranks(train, 1, str(out), 1, None, 10.0, 1)
    assert resumed["resumed_from"] == before and resumed["failures"] == []
