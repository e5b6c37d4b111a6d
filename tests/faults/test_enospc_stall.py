"""A full disk on one rank, and a rank that stalls mid-save: every rank raises the same error,
nothing commits, nothing hangs, and the next save goes on."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from async_ckpt import CheckpointManager, CheckpointSaveError, SharingPattern, StateComponent, faults
from async_ckpt.layout import list_committed
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


class Blob:
    def __init__(self, nbytes: int) -> None:
        self.data = torch.zeros(nbytes, dtype=torch.uint8)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data = state["data"].clone()


def _disk_fills_on_rank1(rank: int, world: int, out: str, inject: bool) -> list:
    blob = Blob(4096)
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), StateComponent("shard", blob, sharing_pattern=SharingPattern.PER_RANK)]
    outcomes = []
    with CheckpointManager(out, comps, timeout_s=20, save_total_limit=1) as mgr:
        for step, size in ((1, 4096), (2, 8 << 20 if rank == 1 else 4096), (3, 4096)):
            blob.data = torch.full((size,), step, dtype=torch.uint8)
            if inject and step == 2:
                faults.arm("mid_write", "enospc", rank=1)
            try:
                mgr.save(step).wait()
                outcomes.append("ok")
            except CheckpointSaveError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            finally:
                faults.disarm()
    return outcomes


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_on_one_rank_fails_the_save_everywhere_and_training_goes_on(tmp_path: Path) -> None:
    """A real 4 MiB tmpfs when we are root (rank 1's 8 MiB shard cannot fit), else an injected ENOSPC."""
    out = tmp_path / "small_disk"
    real = _mount_tmpfs(out, "4m")
    try:
        results = run_ranks(_disk_fills_on_rank1, 2, str(out), not real)
        assert results[0] == results[1], results
        ok1, failed, ok3 = results[0]
        assert ok1 == "ok" and ok3 == "ok"
        assert failed.startswith("CheckpointSaveError: [rank ") and "phase write" in failed
        assert "No space left on device" in failed
        assert [step for step, _ in list_committed(out)] == [3]
        assert not [p for p in os.listdir(out) if p.startswith(".")]
    finally:
        if real:
            subprocess.run(["umount", str(out)], check=False)


def _rank1_stalls(rank: int, world: int, out: str, timeout_s: float) -> dict:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), StateComponent("shard", Blob(64), sharing_pattern=SharingPattern.PER_RANK)]
    with CheckpointManager(out, comps, timeout_s=timeout_s) as mgr:
        if rank == 1:
            faults.arm("mid_write", "stall", rank=1)
        started = time.monotonic()
        try:
            mgr.save(1).wait()
            first = "ok"
        except CheckpointSaveError as exc:
            first = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        faults.disarm()
        dist.barrier()  # rank 1 arrives once its stalled write has ended
        mgr.save(2).wait()
    return {"first": first, "elapsed": elapsed}


def test_a_stalled_rank_makes_every_rank_raise_within_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timeout_s = 2.0
    results = run_ranks(_rank1_stalls, 2, str(tmp_path / "run"), timeout_s, env={faults.STALL_ENV: "6"})
    assert results[0]["first"] == results[1]["first"]
    assert results[0]["first"].startswith("CheckpointTimeoutError: [rank 0 step 1 phase commit] rank(s) 1 did not report within 2s")
    assert results[0]["elapsed"] < timeout_s + 3.0
    assert [step for step, _ in list_committed(tmp_path / "run")] == [2]
