"""Hybrid parallelism on 4 real gloo ranks: DP x TP (DTensor) and DP x PP, each on a DeviceMesh.

One spawn per topology runs several checks, since starting a rank costs seconds of imports:

- DP x TP, mesh ``(dp=2, tp=2)``: an MLP sharded with ``parallelize_module`` (colwise, rowwise).
  Model and optimizer are PER_GROUP over "dp", so each TP shard is written once across the
  replicas; the dataset is PER_GROUP over "tp" (once per replica); RNG per rank. Exact resume
  is bitwise; a resume on mesh ``(dp=4, tp=1)`` is refused naming both shapes; a failure in the
  writer of one "dp" group fails that save on every rank, quickly, and the next save commits.
- DP x PP, mesh ``(dp=2, pp=2)``: two replicas of a hand-written 2-stage pipeline (send/recv
  between stages, gradients averaged over "dp"). Each stage's model and optimizer once per stage,
  the dataset once per replica, RNG per rank (dropout on stage 0). Exact resume is bitwise; a
  2-rank job (one replica) is refused naming both meshes, whose rank counts are the world sizes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from async_ckpt.layout import LOCK_NAME
from async_ckpt import CheckpointLoadError, CheckpointManager, SharingPattern, StateComponent, faults, rng_component
from async_ckpt.mesh import LocalShards
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

PER_GROUP, GLOBAL = SharingPattern.PER_GROUP, SharingPattern.GLOBAL


class Stream:
    """A replica's data: a seeded generator and the number of batches drawn (Stateful)."""

    def __init__(self, seed: int, inputs: int, outputs: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0
        self.shape = (inputs, outputs)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += 1
        return torch.randn(8, self.shape[0], generator=self.gen), torch.randn(8, self.shape[1], generator=self.gen)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.drawn = state["drawn"]


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def _local(value: torch.Tensor) -> torch.Tensor:
    return (value.to_local() if hasattr(value, "to_local") else value).detach().clone()


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": _local(v) for k, v in model.state_dict().items()}
    for index, entries in opt.state_dict()["state"].items():
        out.update({f"opt.{index}.{k}": _local(v) for k, v in entries.items()})
    return out


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def _average_grads(params, group) -> None:
    """Data parallel: average this replica's gradients (local shards) over the "dp" group."""
    for p in params:
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(local, group=group)
        local.div_(dist.get_world_size(group))


# ------------------------------------------------------------------------------------- DP x TP


def _tp_job(mesh, seed: int):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)  # the same full weights on every rank, then sharded
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = Stream(100 + seed + mesh.get_coordinate()[0], 8, 8)  # one stream per replica
    comps = [
        StateComponent("model", LocalShards(model), sharing_pattern=PER_GROUP, group="dp", required=True),
        StateComponent("optimizer", LocalShards(opt), sharing_pattern=PER_GROUP, group="dp"),
        StateComponent("dataset", data, sharing_pattern=PER_GROUP, group="tp"),
        rng_component(),
    ]
    return model, opt, data, comps


def _tp_steps(mesh, model, opt, data, steps: int, trace: list) -> None:
    for _ in range(steps):
        x, y = data.next()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        _average_grads(model.parameters(), mesh.get_group("dp"))
        opt.step()
        opt.zero_grad()
        trace.append((loss.detach().clone(), torch.rand(2)))  # the draw proves the RNG resumed


def _tp_exact_resume(mesh, rank: int, out: str) -> dict:
    torch.manual_seed(0)
    model, opt, data, comps = _tp_job(mesh, 0)
    torch.manual_seed(1000 + rank)
    first: list = []
    with CheckpointManager(out, comps, mesh=mesh, timeout_s=60) as mgr:
        _tp_steps(mesh, model, opt, data, 2, first)
        handle = mgr.save(2)
        saved = {k: _local(v) for k, v in model.state_dict().items()}
        reference: list = []
        _tp_steps(mesh, model, opt, data, 2, reference)  # mutates while the save is written
        handle.wait()
    expected = _snapshot(model, opt)
    model, opt, data, comps = _tp_job(mesh, 7)  # other weights, other data: the load must replace them
    torch.manual_seed(5)
    resumed: list = []
    with CheckpointManager(out, comps, mesh=mesh, timeout_s=60) as mgr:
        step = mgr.load().step
        _tp_steps(mesh, model, opt, data, 2, resumed)
    return {
        "step": step,
        "differences": _differences(expected, _snapshot(model, opt)),
        "same_trace": all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(reference, resumed)),
        "saved_shard": saved,
        "drawn": data.drawn,
    }


def _tp_other_mesh_refused(out: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    other = init_device_mesh("cpu", (4, 1), mesh_dim_names=("dp", "tp"))
    _, _, _, comps = _tp_job(other, 7)
    with CheckpointManager(out, comps, mesh=other, timeout_s=60) as mgr:
        try:
            mgr.load()
        except CheckpointLoadError as exc:
            return str(exc)
    return "no error"


def _group_writer_fails(mesh, out: str) -> dict:
    """Rank 1 writes the only file of "dp" group 1 (TP shard 1); it fails mid-write at step 2."""
    model, _, _, _ = _tp_job(mesh, 0)
    comps = [StateComponent("model", LocalShards(model), sharing_pattern=PER_GROUP, group="dp", required=True)]
    with CheckpointManager(out, comps, mesh=mesh, timeout_s=30) as mgr:
        mgr.save(1).wait()
        faults.arm("mid_write", "raise", rank=1)
        started = time.monotonic()
        try:
            mgr.save(2).wait()
            message = "no error"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
        finally:
            faults.disarm()
        elapsed = time.monotonic() - started
        committed = str(mgr.save(3).wait())
    return {"message": message, "elapsed": elapsed, "committed": committed}


def _dp_tp(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return {
        "resume": _tp_exact_resume(mesh, rank, f"{out}/tp"),
        "refused": _tp_other_mesh_refused(f"{out}/tp"),
        "failure": _group_writer_fails(mesh, f"{out}/fail"),
    }


def test_dp_x_tp_saves_each_shard_once_resumes_bitwise_and_refuses_another_mesh(tmp_path: Path) -> None:
    results = run_ranks(_dp_tp, 4, str(tmp_path), timeout=180)
    ckpt = tmp_path / "tp" / "checkpoint-2"
    for rank, result in enumerate(results):
        resume = result["resume"]
        assert resume["step"] == 2 and resume["differences"] == [] and resume["same_trace"], (rank, resume["differences"])
        assert resume["drawn"] == 4
    assert sorted(os.listdir(ckpt)) == sorted(
        ["checkpoint_manifest.json", "dataset_state_group_tp_0.pt", "dataset_state_group_tp_1.pt",
         "model_state_group_dp_0.safetensors", "model_state_group_dp_1.safetensors",
         "optimizer_state_group_dp_0.pt", "optimizer_state_group_dp_1.pt"] + [f"rng_state_rank_{r}.pt" for r in range(4)]
    )
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    assert manifest["metadata"]["mesh"] == {"dims": ["dp", "tp"], "shape": [2, 2]}
    assert manifest["components"]["model"]["ranks"] == [0, 1]  # the first replica writes both TP shards
    assert manifest["components"]["dataset"]["ranks"] == [0, 2]  # TP rank 0 of each replica
    files = manifest["files"]
    assert [(files[f"model_state_group_dp_{i}.safetensors"]["slot"], files[f"model_state_group_dp_{i}.safetensors"]["rank"]) for i in (0, 1)] == [("group:dp:0", 0), ("group:dp:1", 1)]
    for shard in (0, 1):  # file "dp group i" holds TP shard i, as ranks i and i + 2 had it
        on_disk = load_file(ckpt / f"model_state_group_dp_{shard}.safetensors")
        for rank in (shard, shard + 2):
            saved = results[rank]["resume"]["saved_shard"]
            assert set(on_disk) == set(saved) and all(torch.equal(on_disk[k], saved[k]) for k in saved), (shard, rank)
    assert on_disk["0.weight"].shape == (8, 8) and on_disk["2.weight"].shape == (8, 8)  # halves of 16x8 / 8x16
    for result in results:
        assert "saved on the device mesh (dp=2, tp=2; 4 ranks) and this job's mesh is (dp=4, tp=1; 4 ranks)" in result["refused"]
        assert "has no file" not in result["refused"]  # another mesh is the one reason given, not its side effects
    failures = [r["failure"] for r in results]
    assert len({f["message"] for f in failures}) == 1, failures
    assert failures[0]["message"].startswith("CheckpointSaveError: [rank 1 step 2 component 'model' phase write]"), failures[0]
    assert "model_state_group_dp_1.safetensors" in failures[0]["message"]
    assert max(f["elapsed"] for f in failures) < 20  # an error report, not the 30 s timeout
    assert sorted(n for n in os.listdir(tmp_path / "fail") if n != LOCK_NAME) == ["checkpoint-1", "checkpoint-3"]  # no leftovers


# ------------------------------------------------------------------------------------- DP x PP


def _pp_job(mesh, seed: int):
    """This rank's stage of a 2-stage pipeline, its optimizer, its replica's data, components."""
    torch.manual_seed(seed)
    full = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25),  # stage 0
        torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),  # stage 1
    )
    replica, stage_index = mesh.get_coordinate()
    stage = full[:3] if stage_index == 0 else full[3:]
    opt = torch.optim.Adam(stage.parameters(), lr=0.02)
    data = Stream(200 + seed + replica, 6, 3)
    progress = Progress()
    comps = [
        StateComponent("model", stage, sharing_pattern=PER_GROUP, group="dp", required=True),  # once per stage
        StateComponent("optimizer", opt, sharing_pattern=PER_GROUP, group="dp"),
        StateComponent("dataset", data, sharing_pattern=PER_GROUP, group="pp"),  # once per replica (stage 0 reads)
        StateComponent("trainer", progress, sharing_pattern=GLOBAL),
        rng_component(),  # per rank: dropout on stage 0
    ]
    return stage, opt, data, progress, comps


def _pp_steps(mesh, stage, opt, data, progress, steps: int, losses: list) -> None:
    replica, index = mesh.get_coordinate()
    peer = int(mesh.mesh[replica, 1 - index])
    for _ in range(steps):
        if index == 0:
            x, y = data.next()
            h = stage(x)
            dist.send(h.detach(), peer)
            dist.send(y, peer)
            grad = torch.empty_like(h)
            dist.recv(grad, peer)
            h.backward(grad)
        else:
            h, y = torch.empty(8, 16, requires_grad=False), torch.empty(8, 3)
            dist.recv(h, peer)
            dist.recv(y, peer)
            h.requires_grad_()
            loss = (stage(h) - y).pow(2).mean()
            loss.backward()
            dist.send(h.grad, peer)
            losses.append(loss.detach().clone())
        _average_grads(stage.parameters(), mesh.get_group("dp"))
        opt.step()
        opt.zero_grad()
        progress.step += 1


def _pp_exact_resume(mesh, rank: int, out: str) -> dict:
    stage, opt, data, progress, comps = _pp_job(mesh, 0)
    torch.manual_seed(1000 + rank)
    with CheckpointManager(out, comps, mesh=mesh, timeout_s=60) as mgr:
        _pp_steps(mesh, stage, opt, data, progress, 3, [])
        handle = mgr.save(progress.step)
        reference: list = []
        _pp_steps(mesh, stage, opt, data, progress, 3, reference)
        handle.wait()
    expected = {**_snapshot(stage, opt), "rng": torch.rand(4)}
    stage, opt, data, progress, comps = _pp_job(mesh, 9)
    torch.manual_seed(3)
    resumed: list = []
    with CheckpointManager(out, comps, mesh=mesh, timeout_s=60) as mgr:
        step = mgr.load().step
        _pp_steps(mesh, stage, opt, data, progress, 3, resumed)
    got = {**_snapshot(stage, opt), "rng": torch.rand(4)}
    return {"step": step, "progress": progress.step, "differences": _differences(expected, got),
            "same_losses": len(reference) == len(resumed) and all(torch.equal(a, b) for a, b in zip(reference, resumed))}


def _pp_one_replica_refused(mesh, out: str) -> str:
    """Each replica alone (2 ranks, 1-D mesh "pp") tries to resume the 4-rank checkpoint."""
    stage, _, _, _, _ = _pp_job(mesh, 0)
    comps = [StateComponent("model", stage, sharing_pattern=SharingPattern.PER_RANK, required=True), rng_component()]
    with CheckpointManager(out, comps, mesh=mesh["pp"], process_group=mesh.get_group("pp"), timeout_s=60) as mgr:
        try:
            mgr.load()
        except CheckpointLoadError as exc:
            return str(exc)
    return "no error"


def _dp_pp(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    resume = _pp_exact_resume(mesh, rank, out)
    return {"resume": resume, "refused": _pp_one_replica_refused(mesh, out)}


def test_dp_x_pp_saves_each_stage_once_each_replica_once_and_resumes_bitwise(tmp_path: Path) -> None:
    results = run_ranks(_dp_pp, 4, str(tmp_path / "pp"), timeout=180)
    for rank, result in enumerate(results):
        resume = result["resume"]
        assert resume["step"] == 3 and resume["progress"] == 6, (rank, resume)
        assert resume["differences"] == [] and resume["same_losses"], (rank, resume)
    ckpt = tmp_path / "pp" / "checkpoint-3"
    assert sorted(os.listdir(ckpt)) == sorted(
        ["checkpoint_manifest.json", "trainer_state.pt",
         "model_state_group_dp_0.safetensors", "model_state_group_dp_1.safetensors",  # stage 0, stage 1
         "optimizer_state_group_dp_0.pt", "optimizer_state_group_dp_1.pt",
         "dataset_state_group_pp_0.pt", "dataset_state_group_pp_1.pt"]  # replica 0, replica 1
        + [f"rng_state_rank_{r}.pt" for r in range(4)]
    )
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    assert manifest["metadata"]["mesh"] == {"dims": ["dp", "pp"], "shape": [2, 2]}
    assert manifest["components"]["model"]["ranks"] == [0, 1]
    assert manifest["components"]["dataset"]["ranks"] == [0, 2]
    assert {n: f["slot"] for n, f in manifest["files"].items() if n.startswith("dataset")} == {
        "dataset_state_group_pp_0.pt": "group:pp:0", "dataset_state_group_pp_1.pt": "group:pp:1"}
    assert set(load_file(ckpt / "model_state_group_dp_1.safetensors")) == {"3.weight", "3.bias", "5.weight", "5.bias"}  # stage 1 keeps its indices
    for result in results:
        refused = result["refused"]
        assert "saved on the device mesh (dp=2, pp=2; 4 ranks) and this job's mesh is (pp=2; 2 ranks)" in refused, refused
        assert refused.count("saved on the device mesh") == 1 and "rank(s) 0-1: " in refused, refused  # one reason, shared by both ranks
