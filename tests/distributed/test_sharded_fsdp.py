"""SHARDED checkpoints of FSDP2 models: save on one world size, load on another, bitwise.

Every scenario compares full tensors: the saving job's ``DTensor.full_tensor()`` of every
parameter and AdamW moment against the loading job's, after loading into a freshly built
model and a fresh optimizer (no state yet). Shapes are chosen so that 4 ranks shard unevenly
(5 rows over 4 ranks: 2, 2, 1, 0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from async_ckpt import CheckpointManager, SharingPattern, StateComponent
from async_ckpt.errors import CheckpointCorruptError
from async_ckpt.optim_state import OptimizerState
from tests.helpers.spawn import run_ranks


def build(seed: int, world_size: int, shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 8), torch.nn.Linear(8, 3))
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
        for layer in (model[0], model[2], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def components(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[StateComponent]:
    return [
        StateComponent("model", model, sharing_pattern=SharingPattern.SHARDED, required=True),
        StateComponent("optimizer", OptimizerState(model, optimizer), sharing_pattern=SharingPattern.SHARDED),
    ]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        loss = model(torch.randn(4, 6, generator=gen)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer state tensor as a full tensor, by FQN (collective for DTensors)."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    out = {f"param.{n}": whole(p) for n, p in model.named_parameters()}
    for fqn, entries in OptimizerState(model, optimizer).state_dict()["state"].items():
        out.update({f"optim.{fqn}.{k}": whole(v) for k, v in entries.items()})
    return out


def _save(rank: int, world_size: int, out: str, shard: bool) -> dict | None:
    model, optimizer = build(0, world_size, shard)
    train(model, optimizer, rank)
    with CheckpointManager(out, components(model, optimizer), async_save=True) as manager:
        manager.save(2).wait()
    tensors = full(model, optimizer)
    return tensors if rank == 0 else None


def _load(rank: int, world_size: int, path: str, shard: bool, resave: str | None, damaged: str | None) -> dict | None:
    model, optimizer = build(1, world_size, shard)  # other initial weights, no optimizer state yet
    with CheckpointManager(Path(path).parent, components(model, optimizer)) as manager:
        if damaged is not None:
            with pytest.raises(CheckpointCorruptError, match="Hash mismatch for chunk"):
                manager.load(damaged)
        result = manager.load(path)
        assert result is not None and result.loaded == ["model", "optimizer"]
    tensors = full(model, optimizer)
    train(model, optimizer, rank, steps=1)  # the loaded state trains (DTensor moments placed like params)
    if resave is not None:
        model, optimizer = build(1, world_size, shard)
        with CheckpointManager(resave, components(model, optimizer)) as manager:
            manager.load(path)
            manager.save(2).wait()
    return tensors if rank == 0 else None


def assert_same(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def damage_one_chunk(checkpoint: Path, target: Path) -> str:
    """Copy ``checkpoint`` and flip one byte inside one chunk of rank 1's model file."""
    import json

    shutil.copytree(checkpoint, target)
    manifest = json.loads((target / "checkpoint_manifest.json").read_text())
    record = manifest["files"]["model_state_shard_1.safetensors"]["chunks"][0]
    path = target / "model_state_shard_1.safetensors"
    data = bytearray(path.read_bytes())
    data[record["range"][0]] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(target)


def test_fsdp_4_to_2_to_1_and_1_to_4(tmp_path: Path) -> None:
    saved = run_ranks(_save, 4, str(tmp_path / "w4"), True, timeout=240)[0]
    ckpt4 = tmp_path / "w4" / "checkpoint-2"
    files = sorted(p.name for p in ckpt4.iterdir())
    assert "model_state_shard_3.safetensors" in files and "optimizer_state_shard_0.pt" in files
    bad = damage_one_chunk(ckpt4, tmp_path / "bad" / "checkpoint-2")
    on2 = run_ranks(_load, 2, str(ckpt4), True, str(tmp_path / "w2"), bad, timeout=240)[0]
    assert_same(saved, on2)
    on1 = run_ranks(_load, 1, str(tmp_path / "w2" / "checkpoint-2"), True, None, None, timeout=240)[0]
    assert_same(saved, on1)
    plain = run_ranks(_load, 1, str(ckpt4), False, None, None, timeout=240)[0]  # sharded -> plain model
    assert_same(saved, plain)
    one = run_ranks(_save, 1, str(tmp_path / "w1"), True, timeout=240)[0]
    plain_saved = run_ranks(_save, 1, str(tmp_path / "p1"), False, timeout=240)[0]
    assert_same(one, plain_saved)  # the same training, sharded on one rank or not
    on4 = run_ranks(_load, 4, str(tmp_path / "w1" / "checkpoint-2"), True, None, None, timeout=240)[0]
    assert_same(one, on4)
    from_plain = run_ranks(_load, 4, str(tmp_path / "p1" / "checkpoint-2"), True, None, None, timeout=240)[0]
    assert_same(plain_saved, from_plain)  # plain model's checkpoint -> FSDP2 on 4


def test_export_and_inspect_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    """``async-ckpt export`` writes the full tensors without a process group; inspect shows the layout."""
    import subprocess
    import sys

    import safetensors.torch

    saved = run_ranks(_save, 4, str(tmp_path / "w4"), True, timeout=240)[0]
    ckpt = tmp_path / "w4" / "checkpoint-2"
    run = [sys.executable, "-m", "async_ckpt.cli"]
    subprocess.run([*run, "export", str(ckpt), str(tmp_path / "out")], check=True, capture_output=True, text=True)
    exported = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(n.removeprefix("param.") for n in saved if n.startswith("param."))
    for name, tensor in exported.items():
        assert torch.equal(tensor, saved[f"param.{name}"]), name
    shown = subprocess.run([*run, "inspect", str(ckpt)], check=True, capture_output=True, text=True).stdout
    assert "sharded component 'model'" in shown
    line = next(row for row in shown.splitlines() if row.startswith("0.weight "))
    assert line.split()[1:5] == ["5x6", "float32", "3", "0,1,2"]  # 5 rows over 4 ranks: 2, 2, 1, 0


def _save_then_die(rank: int, world_size: int, out: str) -> dict | None:
    from async_ckpt import faults
    from async_ckpt.errors import CheckpointSaveError

    model, optimizer = build(0, world_size, True)
    train(model, optimizer, rank)
    manager = CheckpointManager(out, components(model, optimizer), timeout_s=5.0)
    manager.save(1).wait()
    tensors = full(model, optimizer)  # collective: before rank 1 dies
    train(model, optimizer, rank, steps=1)
    faults.arm("mid_write", "kill", rank=1)  # SIGKILL rank 1 in the middle of writing its chunks
    with pytest.raises(CheckpointSaveError):
        manager.save(2).wait()
    return tensors


def test_sigkill_mid_save_resumes_from_the_newest_committed(tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks_expect

    outcomes = run_ranks_expect(_save_then_die, 2, str(tmp_path / "run"), timeout=120)
    assert outcomes[1][:2] == ("error", "ProcessDied") and outcomes[0][0] == "ok", outcomes
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    resumed = run_ranks(_resume, 2, str(tmp_path / "run"), timeout=240)[0]
    assert_same(outcomes[0][1], resumed)
    assert not list((tmp_path / "run").glob(".checkpoint-2.*"))  # the dead save's staging is cleaned up


def _resume(rank: int, world_size: int, out: str) -> dict | None:
    model, optimizer = build(1, world_size, True)
    with CheckpointManager(out, components(model, optimizer)) as manager:
        assert manager.load().step == 1  # newest committed, found by itself
    tensors = full(model, optimizer)
    return tensors if rank == 0 else None
