"""async_ckpt.mesh: groups from a mesh, the manifest's mesh record, refusals, DTensor local shards.

Pure parts run on a stand-in mesh; the DTensor and manager parts on a real one-rank gloo world
(module fixture), so no process is spawned.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from async_ckpt import CheckpointConfigError, CheckpointLoadError, CheckpointManager, SharingPattern, StateComponent
from async_ckpt.manifest import read_manifest
from async_ckpt.mesh import LocalShards, check_mesh_ranks, describe_mesh, manifest_metadata, mesh_groups, mesh_record, mesh_refusal


class FakeMesh:
    """Just what mesh.py reads from a DeviceMesh."""

    def __init__(self, ranks: list, names: tuple | None) -> None:
        self.mesh = torch.tensor(ranks)
        self.mesh_dim_names = names

    def get_group(self, name: str) -> str:
        return f"group:{name}"


def _manifest(metadata: dict) -> SimpleNamespace:
    return SimpleNamespace(metadata=metadata)


def test_groups_are_the_named_dimensions_plus_explicit_ones():
    mesh = FakeMesh([[0, 1], [2, 3]], ("dp", "tp"))
    assert mesh_groups(mesh) == {"dp": "group:dp", "tp": "group:tp"}
    assert mesh_groups(mesh, {"pair": "g"}) == {"pair": "g", "dp": "group:dp", "tp": "group:tp"}


def test_a_mesh_without_names_or_with_a_clashing_name_is_refused():
    with pytest.raises(CheckpointConfigError, match="has no dimension names.*mesh_dim_names"):
        mesh_groups(FakeMesh([0, 1], None))
    with pytest.raises(CheckpointConfigError, match="'dp' are both mesh dimensions and entries of process_groups"):
        mesh_groups(FakeMesh([[0, 1], [2, 3]], ("dp", "tp")), {"dp": "mine"})


def test_record_and_description():
    record = mesh_record(FakeMesh([[0, 1, 2], [3, 4, 5]], ("dp", "tp")))
    assert record == {"dims": ["dp", "tp"], "shape": [2, 3]}
    assert describe_mesh(record) == "(dp=2, tp=3; 6 ranks)"
    assert json.loads(json.dumps(record)) == record


def test_mesh_must_span_the_managers_ranks():
    check_mesh_ranks(FakeMesh([[2, 3], [0, 1]], ("dp", "tp")), [0, 1, 2, 3])
    with pytest.raises(CheckpointConfigError, match=r"spans ranks \[0, 1\] but the checkpoint's process group has ranks \[0, 1, 2, 3\]"):
        check_mesh_ranks(FakeMesh([0, 1], ("tp",)), [0, 1, 2, 3])


@pytest.mark.parametrize(
    "saved,current,expected",
    [
        ({"dims": ["dp", "tp"], "shape": [2, 2]}, {"dims": ["dp", "tp"], "shape": [2, 2]}, None),
        (None, {"dims": ["dp"], "shape": [4]}, None),  # saved without a mesh: component checks decide
        ({"dims": ["dp"], "shape": [4]}, None, None),
        ({"dims": ["dp", "tp"], "shape": [2, 2]}, {"dims": ["dp", "tp"], "shape": [4, 1]},
         "saved on the device mesh (dp=2, tp=2; 4 ranks) and this job's mesh is (dp=4, tp=1; 4 ranks)"),
        ({"dims": ["dp", "pp"], "shape": [2, 2]}, {"dims": ["dp", "tp"], "shape": [2, 2]}, "(dp=2, pp=2; 4 ranks)"),
        ({"dims": ["dp", "tp"], "shape": [2, 2]}, {"dims": ["pp"], "shape": [2]}, "this job's mesh is (pp=2; 2 ranks)"),
        ({"dims": "dp", "shape": [2]}, {"dims": ["dp"], "shape": [2]}, "malformed"),
        ({"dims": ["dp"], "shape": [True]}, {"dims": ["dp"], "shape": [1]}, "malformed"),
    ],
)
def test_mesh_refusal(saved, current, expected):
    metadata = {} if saved is None else {"mesh": saved}
    got = mesh_refusal(_manifest(metadata), current)
    if expected is None:
        assert got == []
    else:
        assert len(got) == 1 and expected in got[0], got
    assert mesh_refusal(None, current) == []  # a manifest that did not read is the damage check's business


def test_manifest_metadata():
    mesh = FakeMesh([[0, 1], [2, 3]], ("dp", "tp"))
    assert manifest_metadata(None, None) == {}
    assert manifest_metadata({"run": "a"}, mesh) == {"run": "a", "mesh": {"dims": ["dp", "tp"], "shape": [2, 2]}}
    with pytest.raises(CheckpointConfigError, match="metadata\\['mesh'\\] is set by the manager"):
        manifest_metadata({"mesh": 1}, mesh)
    with pytest.raises(CheckpointConfigError, match="JSON-serialisable"):
        manifest_metadata({"t": torch.zeros(1)}, None)


def test_unknown_group_refused_when_the_manager_is_built(tmp_path):
    comp = StateComponent("model", torch.nn.Linear(2, 2), sharing_pattern=SharingPattern.PER_GROUP, group="pp")
    with pytest.raises(CheckpointConfigError, match="unknown process group 'pp' \\(known: dp, tp\\)"):
        CheckpointManager(tmp_path, [comp], mesh=FakeMesh([[0, 1], [2, 3]], ("dp", "tp")))


def test_local_shards_passes_plain_state_through():
    model = torch.nn.Linear(3, 2)
    wrapped = LocalShards(model)
    state = wrapped.state_dict()
    assert set(state) == {"weight", "bias"} and all(type(v) is torch.Tensor for v in state.values())
    other = torch.nn.Linear(3, 2)
    LocalShards(other).load_state_dict(state)
    assert torch.equal(other.weight, model.weight)


# --------------------------------------------------------------------------- one-rank gloo world


@pytest.fixture(scope="module")
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    finally:
        dist.destroy_process_group()


def _tp_model(mesh, seed: int) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    return parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _train(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        model(torch.randn(3, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _locals(state) -> dict:
    return {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in state.items()}


def test_local_shards_round_trip_model_and_fresh_optimizer(one_rank):
    from torch.distributed.tensor import DTensor

    model = _tp_model(one_rank, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy((LocalShards(model).state_dict(), LocalShards(opt).state_dict()))  # as if from disk
    assert not any(isinstance(v, DTensor) for v in saved_model.values())
    assert not any(isinstance(v, DTensor) for s in saved_opt["state"].values() for v in s.values())
    twin = _tp_model(one_rank, 1)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)  # no state yet: placements come from the params
    LocalShards(twin).load_state_dict(saved_model)
    LocalShards(twin_opt).load_state_dict(saved_opt)
    assert all(isinstance(v, DTensor) for v in twin_opt.state_dict()["state"][0].values() if v.dim())
    _train(model, opt, 2)
    _train(twin, twin_opt, 2)
    for (name, a), b in zip(_locals(model.state_dict()).items(), _locals(twin.state_dict()).values()):
        assert torch.equal(a, b), name


def test_local_shards_refuses_a_shard_of_another_shape(one_rank):
    state = LocalShards(_tp_model(one_rank, 0)).state_dict()
    state["0.weight"] = state["0.weight"][:3]
    with pytest.raises(CheckpointLoadError, match=r"saved shard 0.weight has shape \(3, 4\) but this rank's shard is \(6, 4\)"):
        LocalShards(_tp_model(one_rank, 1)).load_state_dict(state)


def test_manager_records_the_mesh_and_refuses_another(one_rank, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    def comps(seed):
        model = _tp_model(one_rank, seed)
        return [StateComponent("model", LocalShards(model), sharing_pattern=SharingPattern.PER_GROUP, group="dp", required=True)]

    with CheckpointManager(tmp_path, comps(0), mesh=one_rank, metadata={"run": "unit"}) as mgr:
        path = mgr.save(3).wait()
    manifest = read_manifest(path)
    assert manifest.metadata == {"run": "unit", "mesh": {"dims": ["dp", "tp"], "shape": [1, 1]}}
    assert [(n, f.slot) for n, f in manifest.files.items()] == [("model_state_group_dp_0.safetensors", "group:dp:0")]
    with CheckpointManager(tmp_path, comps(1), mesh=one_rank) as mgr:
        assert mgr.load().step == 3
    other = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    with CheckpointManager(tmp_path, comps(1), mesh=other) as mgr:
        with pytest.raises(CheckpointLoadError, match=r"saved on the device mesh \(dp=1, tp=1; 1 ranks\) and this job's mesh is \(dp=1; 1 ranks\)"):
            mgr.load()
