"""SIGKILL at every named fault point, on 1 and 2 ranks: resume always finds the right checkpoint.

Fault table (DCP style): the job saves steps 1..4 and the fault fires at step 3 on ``kill_rank``.
When the kill comes before the commit, resume must pick step 2; when it comes after (retention
points), step 3. A fresh start then removes the torn staging directory, and a resumed job
continues from that step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ckpt.faults import POINTS
from tests.faults.scenario import newest_good, start_manager_cleans, train
from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

AFTER_COMMIT = {"after_publish", "before_retention", "mid_delete", "after_delete"}
ON_RANK0_ONLY = {"before_manifest", "before_publish", "mid_replace", "mid_recover"} | AFTER_COMMIT
# Points a job saving steps 1, 2, 3, ... never reaches: a re-save of a step, and start-up recovery
# with leftovers. tests/faults/test_rundir_kills.py kills a real job at each of them.
ELSEWHERE = {"mid_replace", "mid_recover"}
IN_TRAINING = [point for point in POINTS if point not in ELSEWHERE]

TWO_RANKS_BY_DEFAULT = {"mid_write", "before_report", "before_publish", "after_delete"}


def _cases() -> list:
    """Every point on 1 rank, and on 2 ranks; the 2-rank cases not listed above run in the full suite."""
    cases = [(point, 1, 0) for point in IN_TRAINING]
    for point in IN_TRAINING:
        marks = () if point in TWO_RANKS_BY_DEFAULT else (pytest.mark.slow,)
        cases.append(pytest.param(point, 2, 0 if point in ON_RANK0_ONLY else 1, marks=marks))
    return cases


@pytest.mark.parametrize("point,world,kill_rank", _cases())
def test_kill_at_fault_point(tmp_path: Path, point: str, world: int, kill_rank: int) -> None:
    out = tmp_path / "run"
    outcomes = run_ranks_expect(train, world, str(out), 4, (point, "kill", kill_rank, 3), 2.0, 1, timeout=120)
    assert outcomes[kill_rank][:2] == ("error", "ProcessDied"), outcomes
    expected = 3 if point in AFTER_COMMIT else 2  # after the commit: step 3 stands, retention was cut short
    assert newest_good(out, world) == expected
    start_manager_cleans(out)
    resumed = run_ranks(train, world, str(out), 1, None, 10.0, 1, timeout=120)
    assert [r["resumed_from"] for r in resumed] == [expected] * world
    assert [r["failures"] for r in resumed] == [[]] * world
    assert newest_good(out, world) == expected + 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_randomized_kills_on_two_ranks(tmp_path: Path) -> None:
    """40 rounds: a random point, on a rank it can fire on, at a random step of a 3-save run."""
    import os
    import random

    rng = random.Random(int(os.environ.get("ASYNC_CKPT_SEED", "7")))
    out = tmp_path / "run"
    newest = 0
    for _ in range(40):
        point = rng.choice(IN_TRAINING)
        kill_rank = 0 if point in ON_RANK0_ONLY else rng.randrange(2)
        at_step = newest + rng.randint(1, 3)
        outcomes = run_ranks_expect(train, 2, str(out), 3, (point, "kill", kill_rank, at_step), 2.0, 1, timeout=120)
        assert outcomes[kill_rank][:2] == ("error", "ProcessDied"), (point, outcomes)
        expected = at_step if point in AFTER_COMMIT else at_step - 1
        assert newest_good(out, 2) == expected, (point, kill_rank, at_step)
        newest = expected
