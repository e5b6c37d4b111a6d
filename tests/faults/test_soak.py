"""Soak: 200 async saves with retention in one process; memory, descriptors and threads stay flat."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from async_ckpt import CheckpointManager, StateComponent, rng_component
from async_ckpt.layout import list_committed
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.timeout(300)]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _sample() -> dict:
    return {"rss": _rss_bytes(), "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count()}


def _soak(rank: int, world: int, out: str, saves: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))  # ~0.5 MiB
    optimizer = torch.optim.AdamW(model.parameters())
    comps = [StateComponent("model", model, required=True), StateComponent("optimizer", optimizer), rng_component()]
    samples = {}
    with CheckpointManager(out, comps, save_total_limit=2) as mgr:
        for step in range(1, saves + 1):
            model(torch.randn(4, 256)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            mgr.save(step)
            if step == 1:
                first_allocations = mgr._pool.stats.allocations
            if step in (20, saves):
                mgr.wait()
                mgr._committer.submit(lambda: None).result()  # retention of the last save done too
                samples[step] = _sample()
        allocations = mgr._pool.stats.allocations
    return {"samples": samples, "allocations": (first_allocations, allocations), "committed": [s for s, _ in list_committed(out)]}


def test_two_hundred_async_saves_leave_memory_fds_and_threads_flat(tmp_path: Path) -> None:
    result = run_ranks(_soak, 1, str(tmp_path / "run"), 200, timeout=240)[0]
    warm, end = result["samples"][20], result["samples"][200]
    assert end["rss"] - warm["rss"] < 30 << 20, f"RSS drifted {(end['rss'] - warm['rss']) / 2**20:.1f} MiB"
    assert abs(end["fds"] - warm["fds"]) <= 2, (warm, end)
    assert end["threads"] == warm["threads"], (warm, end)
    assert result["committed"] == [199, 200], "retention keeps the newest two"
    first, last = result["allocations"]
    assert first == last == 4 + 12 + 3, "one buffer per tensor (model 4, AdamW 3 per parameter, RNG 3), by the first save only"
