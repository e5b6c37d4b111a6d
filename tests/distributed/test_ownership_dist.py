"""Ownership on a 2-rank gloo job: rank 0 owns the run directory once for the job; a held
directory refuses the whole job with the same error on every rank."""

from __future__ import annotations

import os

import pytest
import torch

from async_ckpt import CheckpointLockError, CheckpointManager, StateComponent, ownership
from async_ckpt.ownership import read_holder
from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def _job(rank: int, world: int, out: str) -> dict:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True)]
    with CheckpointManager(out, comps, timeout_s=20) as mgr:
        holder = read_holder(out)
        refused = ""
        if rank == 1:  # another process of the same job: the directory is rank 0's, not free
            try:
                ownership.acquire(out, 0.3, renew=False).release()
            except CheckpointLockError as exc:
                refused = str(exc)
        path = mgr.save(1).wait()
        return {"pid": os.getpid(), "holder": holder.pid, "owns": mgr._ownership is not None, "refused": refused, "path": str(path)}


def test_rank0_of_a_two_rank_job_owns_the_directory_once(tmp_path):
    out = str(tmp_path / "run")
    r0, r1 = run_ranks(_job, 2, out)
    assert r0["holder"] == r1["holder"] == r0["pid"]
    assert r0["owns"] and not r1["owns"]
    assert f"pid {r0['pid']}" in r1["refused"]
    assert r0["path"] == r1["path"] == os.path.join(out, "checkpoint-1")
    assert read_holder(out).released


def _blocked(rank: int, world: int, out: str) -> None:
    CheckpointManager(out, [StateComponent("model", torch.nn.Linear(4, 4))], lock_timeout_s=0.5)


def test_a_held_directory_refuses_the_job_on_every_rank(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = ownership.acquire(out, 0, renew=False)
    try:
        outcomes = run_ranks_expect(_blocked, 2, str(out))
    finally:
        held.release()
    assert [o[:2] for o in outcomes] == [("error", "CheckpointLockError")] * 2
    assert outcomes[0][2] == outcomes[1][2] and f"pid {os.getpid()}" in outcomes[0][2]
