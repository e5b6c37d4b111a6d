"""A training job whose state at step s is a known function of s, and checks on what is on disk.

Shared by the fault tests. ``train`` runs inside a rank (spawned by ``run_ranks``); the checks
run in the pytest process and read checkpoints through the engine's own read path
(``read_candidate``) with the topology of each rank, so a 2-rank checkpoint is verified without
starting processes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from async_ckpt import CheckpointManager, CheckpointSaveError, SharingPattern, StateComponent, faults
from async_ckpt.layout import list_committed
from async_ckpt.loading import read_candidate
from async_ckpt.topology import Topology


class StepState:
    """Every tensor equals a function of (step, rank): checkable after any fault."""

    def __init__(self, rank: int = 0, size: int = 1 << 16) -> None:
        self.rank = rank
        self.big = torch.zeros(size)
        self.step = 0

    def set_step(self, step: int) -> None:
        self.big.fill_(step * 10 + self.rank)
        self.step = step

    def state_dict(self) -> dict:
        return {"big": self.big, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.big.copy_(state["big"])
        self.step = state["step"]


class Weights:
    """A model-like component (flat tensors, saved as safetensors) equal to the step everywhere."""

    def __init__(self) -> None:
        self.w = torch.zeros(32, 32)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w.copy_(state["w"])


def components(state: StepState, weights: Weights) -> list[StateComponent]:
    return [
        StateComponent("model", weights, required=True),
        StateComponent("trainer", state, sharing_pattern=SharingPattern.PER_RANK),
    ]


def train(rank: int, world: int, out: str, steps: int, fault: tuple[str, str, int, int] | None, timeout_s: float = 3.0, limit: int | None = 2, compression: str | None = None) -> dict:
    """Resume, then save every step; arm ``fault=(point, action, rank, at_step)`` at one step."""
    state, weights = StepState(rank), Weights()
    manager = CheckpointManager(out, components(state, weights), timeout_s=timeout_s, save_total_limit=limit, compression=compression)
    result = manager.load()
    start = result.step if result else 0
    failures = []
    for step in range(start + 1, start + steps + 1):
        state.set_step(step)
        weights.w.fill_(step)
        armed = fault is not None and step == fault[3]
        if armed:  # the fault belongs to this save alone, retention included
            _drain(manager)
            faults.arm(fault[0], fault[1], rank=fault[2])
        try:
            manager.save(step).wait()
        except CheckpointSaveError as exc:
            failures.append((step, type(exc).__name__, str(exc)))
        finally:
            if armed:
                _drain(manager)
                faults.disarm()
    manager.close()
    return {"resumed_from": start, "failures": failures}


def _drain(manager: CheckpointManager) -> None:
    """Wait until the commit thread is idle: the last save's retention has run too."""
    manager._committer.submit(lambda: None).result()


def newest_good(out: Path, world: int) -> int:
    """The step resume would pick, checked bitwise for every rank; 0 when there is none."""
    for step, path in reversed(list_committed(out)):
        plans = [read_candidate(path, components(StepState(r), Weights()), Topology(rank=r, world_size=world), verify=True, strict=True) for r in range(world)]
        if any(p.damage or p.refusal for p in plans):
            continue
        for rank, plan in enumerate(plans):
            assert plan.states["trainer"]["step"] == step
            assert torch.equal(plan.states["trainer"]["big"], torch.full((1 << 16,), float(step * 10 + rank)))
            assert torch.equal(plan.states["model"]["w"], torch.full((32, 32), float(step)))
        return step
    return 0


def start_manager_cleans(out: Path) -> None:
    """A new manager (rank 0) removes every leftover of the killed job."""
    from async_ckpt.layout import list_leftovers

    with CheckpointManager(out, components(StepState(), Weights())):
        leftovers = list_leftovers(out)
    assert not leftovers, f"leftovers survived a restart: {leftovers}"
