"""CheckpointManager on real gloo ranks: every sharing pattern, failures on one rank, dead ranks.

Each test spawns 2 or 4 ranks with ``run_ranks``; state is checked bitwise after a real round
trip through the files on disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from async_ckpt import CheckpointManager, SharingPattern, StateComponent, ValidationLevel, faults, rng_component
from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


class Box:
    """A minimal Stateful holding named tensors and one Python value."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = dict(tensors)
        self.note = "fresh"

    def state_dict(self) -> dict:
        return {"tensors": self.tensors, "note": self.note}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["tensors"].items():
            self.tensors[name].copy_(value)
        self.note = state["note"]


def _components(rank: int, world: int, seed: int, pair_group) -> list[StateComponent]:
    """One component per sharing pattern, values a function of (seed, rank/group/node)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(64, 8, generator=g)
    node = int(os.environ.get("GROUP_RANK", "0"))
    pair = rank // 2
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.copy_(shared[:4])
        model.bias.fill_(seed)
    comps = [
        StateComponent("model", model, required=True),
        StateComponent("replicated", Box(w=shared.clone()), sharing_pattern=SharingPattern.REPLICATED, validation=ValidationLevel.TENSOR),
        StateComponent("optimizer", Box(w=torch.full((3,), float(seed * 10 + rank))), sharing_pattern=SharingPattern.PER_RANK),
        StateComponent("pernode", Box(w=torch.full((2,), float(seed * 10 + node))), sharing_pattern=SharingPattern.PER_NODE),
        rng_component(),
    ]
    if pair_group is not None:
        comps.append(StateComponent("pergroup", Box(w=torch.full((2,), float(seed * 10 + pair))), sharing_pattern=SharingPattern.PER_GROUP, group="pair"))
    return comps


def _pair_groups(world: int):
    """Split the world into pairs [0,1], [2,3]; every rank must create every group."""
    mine = None
    for start in range(0, world, 2):
        group = dist.new_group(ranks=list(range(start, min(start + 2, world))), backend="gloo")
        if start <= dist.get_rank() < start + 2:
            mine = group
    return mine


def _flatten(components: list[StateComponent]) -> dict[str, torch.Tensor]:
    out = {}
    for comp in components:
        state = comp.stateful.state_dict()
        if comp.key == "rng":
            out["rng.torch_cpu"] = state["torch_cpu"].clone()
            continue
        tensors = state["tensors"] if "tensors" in state else state
        for name, value in tensors.items():
            out[f"{comp.key}.{name}"] = value.detach().clone()
    return out


def _all_patterns(rank: int, world: int, out: str) -> dict:
    pair = _pair_groups(world)
    saved = _components(rank, world, seed=1, pair_group=pair)
    torch.manual_seed(100 + rank)
    with CheckpointManager(out, saved, process_groups={"pair": pair}, timeout_s=60) as mgr:
        expected = _flatten(saved)
        handle = mgr.save(7)
        for comp in saved:  # mutate everything in place right after save() returns
            state = comp.stateful.state_dict()
            for value in (state.get("tensors") or {}).values():
                value.add_(1000)
        committed = handle.wait()
    fresh = _components(rank, world, seed=2, pair_group=pair)
    torch.manual_seed(999)
    with CheckpointManager(out, fresh, process_groups={"pair": pair}, timeout_s=60) as mgr:
        result = mgr.load()
    got = _flatten(fresh)
    mismatched = [k for k in expected if not torch.equal(expected[k], got[k])]
    return {"committed": str(committed), "step": result.step, "loaded": result.loaded, "mismatched": mismatched}


@pytest.mark.parametrize("world", [2, 4])
def test_every_sharing_pattern_round_trips(tmp_path: Path, world: int) -> None:
    out = str(tmp_path / "run")
    per_node = 2  # two simulated nodes of world/2 ranks each

    def env(rank: int) -> dict:
        return {"LOCAL_RANK": str(rank % (world // per_node)), "GROUP_RANK": str(rank // (world // per_node)), "LOCAL_WORLD_SIZE": str(world // per_node)}

    results = run_ranks(_all_patterns, world, out, env=env, timeout=180)
    for rank, result in enumerate(results):
        assert result["mismatched"] == [], f"rank {rank}"
        assert result["step"] == 7
        assert result["committed"] == str(tmp_path / "run" / "checkpoint-7")
    files = sorted(os.listdir(tmp_path / "run" / "checkpoint-7"))
    expected = {"checkpoint_manifest.json", "model.safetensors", "replicated_state.pt", "pernode_state_node_0.pt", "pernode_state_node_1.pt"}
    expected |= {f"optimizer_state_rank_{r}.pt" for r in range(world)} | {f"rng_state_rank_{r}.pt" for r in range(world)}
    expected |= {f"pergroup_state_group_pair_{i}.pt" for i in range(world // 2)}
    assert set(files) == expected
    manifest = json.loads((tmp_path / "run" / "checkpoint-7" / "checkpoint_manifest.json").read_text())
    assert manifest["world_size"] == world
    assert manifest["components"]["optimizer"]["ranks"] == list(range(world))
    assert manifest["components"]["pernode"]["ranks"] == [0, world // 2]
    assert manifest["components"]["model"]["ranks"] == [0]
    assert set(manifest["timings"]) == {str(r) for r in range(world)}
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".")]


def _one_rank_fails_write(rank: int, world: int, out: str) -> str:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), rng_component()]
    with CheckpointManager(out, comps, timeout_s=60) as mgr:
        mgr.save(1).wait()
        faults.arm("mid_write", "raise", rank=1)
        try:
            handle = mgr.save(2)
            try:
                handle.wait()
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
            else:
                message = "no error"
        finally:
            faults.disarm()
        mgr.save(3).wait()  # training and the next save go on
    return message


def test_one_rank_failing_its_write_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    messages = run_ranks(_one_rank_fails_write, 2, out)
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("CheckpointSaveError: [rank 1 step 2 component 'rng' phase write]")
    assert "injected fault at mid_write" in messages[0]
    assert sorted(n for n in os.listdir(out) if n != "async_ckpt.lock") == ["checkpoint-1", "checkpoint-3"]


def _rank_dies_before_report(rank: int, world: int, out: str, timeout_s: float) -> dict:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), rng_component()]
    mgr = CheckpointManager(out, comps, timeout_s=timeout_s)
    if rank == 1:
        faults.arm("before_report", "kill")
    started = time.monotonic()
    try:
        mgr.save(1).wait()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - started}
    return {"error": None, "elapsed": time.monotonic() - started}


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_never_reports_makes_the_others_raise_in_time(tmp_path: Path, world: int) -> None:
    out = str(tmp_path / "run")
    timeout_s = 3.0
    outcomes = run_ranks_expect(_rank_dies_before_report, world, out, timeout_s, timeout=120)
    assert outcomes[1][0] == "error" and outcomes[1][1] == "ProcessDied"
    for rank in [0] + list(range(2, world)):
        status, result = outcomes[rank]
        assert status == "ok", outcomes[rank]
        assert result["error"] is not None and result["error"].startswith("CheckpointTimeoutError"), result
        assert "rank(s) 1 did not report" in result["error"]
        assert result["elapsed"] < timeout_s + 6.0  # rank 0's timeout plus the others' margin
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def _rank0_dies_before_publish(rank: int, world: int, out: str) -> str:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), rng_component()]
    mgr = CheckpointManager(out, comps, timeout_s=2.0)
    if rank == 0:
        faults.arm("before_manifest", "kill")
    try:
        mgr.save(1).wait()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_rank0_dying_mid_commit_is_reported_as_a_timeout(tmp_path: Path) -> None:
    outcomes = run_ranks_expect(_rank0_dies_before_publish, 2, str(tmp_path / "run"))
    assert outcomes[0][1] == "ProcessDied"
    assert outcomes[1][0] == "ok" and outcomes[1][1].startswith("CheckpointTimeoutError")
    assert "rank 0 did not publish" in outcomes[1][1]
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def _diverged_replica(rank: int, world: int, out: str) -> str:
    weight = torch.ones(4, 4) + (rank == 1)
    comps = [StateComponent("model", Box(w=weight), sharing_pattern=SharingPattern.REPLICATED, validation=ValidationLevel.TENSOR, required=True, file_format="torch")]
    with CheckpointManager(out, comps) as mgr:
        try:
            mgr.save(1)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"


def test_replication_validation_failure_raises_on_every_rank(tmp_path: Path) -> None:
    messages = run_ranks(_diverged_replica, 2, str(tmp_path / "run"))
    for message in messages:
        assert message.startswith("ReplicationValidationError: Replication validation failed for component 'model'"), message
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def _skip_when_busy(rank: int, world: int, out: str) -> list:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True)]
    with CheckpointManager(out, comps, on_busy="skip") as mgr:
        first = mgr.save(1)
        first.wait()  # settled: from here only this test touches the flag
        if rank == 1:
            first._released.clear()  # pretend rank 1's writers still hold the buffers
        second = mgr.save(2)
        first._released.set()
        return [first.skipped, second.skipped]


def test_on_busy_skip_is_agreed_by_every_rank(tmp_path: Path) -> None:
    assert run_ranks(_skip_when_busy, 2, str(tmp_path / "run")) == [[False, True], [False, True]]


class _Picky(Box):
    """Loads everywhere but on rank 1."""

    def load_state_dict(self, state: dict) -> None:
        if dist.get_rank() == 1:
            raise ValueError("rank 1 refuses this state")
        super().load_state_dict(state)


def _load_agreement(rank: int, world: int, out: str) -> list:
    comps = [StateComponent("model", torch.nn.Linear(4, 4), required=True), StateComponent("picky", _Picky(w=torch.zeros(2)))]
    messages = []
    with CheckpointManager(out, comps) as mgr:
        mgr.save(1).wait()
        for target in (None, out + "/checkpoint-1" if rank == 0 else out + "/checkpoint-404"):
            try:
                mgr.load(target)
                messages.append("loaded")
            except Exception as exc:
                messages.append(f"{type(exc).__name__}: {exc}")
    return messages


def test_load_failures_on_one_rank_raise_on_every_rank(tmp_path: Path) -> None:
    results = run_ranks(_load_agreement, 2, str(tmp_path / "run"))
    assert results[0][0] == results[1][0], results
    assert results[0][0].startswith("CheckpointLoadError: [rank 1 step 1 component 'picky'] load_state_dict failed: ValueError: rank 1 refuses")
    for rank in (0, 1):  # each rank was given its own path; every rank raises, naming the rank that could not see it
        assert results[rank][1].startswith("CheckpointNotFoundError: no checkpoint at") and "not visible to rank(s) 1" in results[rank][1]
