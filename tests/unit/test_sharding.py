"""Chunk planning and overlap math (pure), chunk records in the manifest, and format_version 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Partial

from async_ckpt import CheckpointManager, SharingPattern, StateComponent
from async_ckpt.errors import CheckpointConfigError, CheckpointCorruptError
from async_ckpt.manifest import FORMAT_VERSION, read_manifest
from async_ckpt.optim_state import OptimizerState
from async_ckpt.sharding import Box, copy_region, covered, get, overlap, owns_chunk, put, region_slices, skeleton, walk

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"


def test_overlap_of_boxes() -> None:
    assert overlap(Box((0, 0), (4, 6)), Box((2, 3), (4, 6))) == Box((2, 3), (2, 3))
    assert overlap(Box((0,), (2,)), Box((2,), (2,))) is None  # touching is not overlapping
    assert overlap(Box((0,), (5,)), Box((1,), (0,))) is None  # an empty shard meets nothing
    assert overlap(Box((), ()), Box((), ())) == Box((), ())  # a scalar overlaps itself


def test_region_slices_and_copy_between_shardings() -> None:
    full = torch.arange(5 * 3).reshape(5, 3)
    saved = [
        (Box((0, 0), (2, 3)), full[0:2]),
        (Box((2, 0), (2, 3)), full[2:4]),
        (Box((4, 0), (1, 3)), full[4:5]),
    ]  # 4 ranks: 2,2,1,0
    wanted = Box((3, 0), (2, 3))  # rank 1 of 2: rows 3..4
    assert region_slices(Box((3, 1), (1, 2)), wanted) == (slice(0, 1), slice(1, 3))
    out = torch.full((2, 3), -1)
    assert sum(copy_region(out, wanted, t, b) for b, t in saved) == 6
    assert torch.equal(out, full[3:5])
    assert covered([b for b, _ in saved], wanted) == 6
    assert covered([saved[0][0]], wanted) == 0


def test_owner_of_a_replicated_chunk_is_coordinate_zero() -> None:
    assert owns_chunk([Shard(0)], [3])
    assert owns_chunk([Replicate(), Shard(0)], [0, 1])
    assert not owns_chunk([Replicate(), Shard(0)], [1, 1])
    assert not owns_chunk([Shard(0), Replicate()], [0, 1])
    with pytest.raises(CheckpointConfigError, match="Partial"):
        owns_chunk([Partial()], [0])


def test_tree_helpers() -> None:
    state = {
        "state": {"w": {"step": torch.tensor(1.0), "m": torch.ones(2)}},
        "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
    }
    assert [p for p, _ in walk(state)] == [
        ("state", "w", "step"),
        ("state", "w", "m"),
        ("groups", 0, "lr"),
        ("groups", 0, "betas", 0),
        ("groups", 0, "betas", 1),
    ]
    skel = skeleton(state)
    assert skel["state"]["w"] == {"step": None, "m": None} and skel["groups"][0]["betas"] == (0.9, 0.99)
    put(skel, ("state", "w", "m"), "x")
    assert get(skel, ("state", "w", "m")) == "x" and get(skel, ("nope", 1)) is None
    assert put({}, ("a",), 1) == {"a": 1}


def _plain(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer


def _components(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[StateComponent]:
    return [
        StateComponent("model", model, sharing_pattern=SharingPattern.SHARDED, required=True),
        StateComponent("optimizer", OptimizerState(model, optimizer), sharing_pattern="sharded"),
    ]


def test_sharded_manifest_records_and_a_damaged_record(tmp_path: Path) -> None:
    model, optimizer = _plain(0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    with CheckpointManager(
        tmp_path / "run", _components(model, optimizer), async_save=False, compression="zstd"
    ) as manager:
        manager.save(1)
    ckpt = tmp_path / "run" / "checkpoint-1"
    manifest = read_manifest(ckpt)
    assert manifest.format_version == FORMAT_VERSION == 2
    entry = manifest.files["model_state_shard_0.safetensors"]  # never compressed: ranged reads need raw bytes
    assert entry.codec is None and entry.slot == "shard:0"
    record = entry.chunks[0]
    assert (
        record["fqn"] == "0.weight"
        and record["shape"] == [3, 4]
        and record["offsets"] == [0, 0]
        and record["dtype"] == "float32"
    )
    data = (ckpt / "model_state_shard_0.safetensors").read_bytes()
    assert data[record["range"][0] : record["range"][1]] == model[0].weight.detach().numpy().tobytes()
    import safetensors.torch  # stock readers open the files

    assert torch.equal(safetensors.torch.load(data)["0.weight"], model[0].weight.detach())
    assert torch.load(ckpt / "optimizer_state_shard_0.pt", weights_only=True)["skeleton"]["param_groups"][0][
        "params"
    ] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    raw = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    raw["files"]["model_state_shard_0.safetensors"]["chunks"][0]["range"][1] += 4  # no longer the chunk's size
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "checkpoint_manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointCorruptError, match="byte range"):
        read_manifest(bad)


def test_fresh_optimizer_loads_fqn_keyed_state(tmp_path: Path) -> None:
    model, optimizer = _plain(0)
    for _ in range(2):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
    with CheckpointManager(tmp_path, _components(model, optimizer), async_save=True) as manager:
        manager.save(2).wait()
    model2, optimizer2 = _plain(1)
    with CheckpointManager(tmp_path, _components(model2, optimizer2)) as manager:
        assert manager.load().loaded == ["model", "optimizer"]
    a, b = optimizer.state_dict(), optimizer2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entries in a["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_format_v1_checkpoint_still_loads(tmp_path: Path) -> None:
    """A checkpoint written by the release before SHARDED (format_version 1) loads unchanged."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoint-3", run / "checkpoint-3")
    assert read_manifest(run / "checkpoint-3").format_version == 1
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    got = {}

    class Extra:
        def state_dict(self):  # noqa: ANN202
            return {}

        def load_state_dict(self, state):  # noqa: ANN001, ANN202
            got.update(state)

    components = [
        StateComponent("model", model, required=True),
        StateComponent("optimizer", optimizer),
        StateComponent("extra", Extra(), sharing_pattern=SharingPattern.PER_RANK),
    ]
    with CheckpointManager(run, components) as manager:
        assert manager.load().step == 3
    for name, value in expected["model"].items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"])
    assert got["n"] == 7 and torch.equal(got["t"], torch.arange(4))
