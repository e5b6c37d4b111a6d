"""SHARDED checkpoints of a 2-D (FSDP x TP) model: saved on a (dp=2, tp=2) mesh, loaded on FSDP 2 and on 1.

The saving job's full tensors (``full_tensor()`` of every parameter and AdamW moment) must
equal the loading job's bitwise. The TP dimension replicates the biases of the row-parallel
layer, so those chunks have one writer per dp shard (checked on the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from async_ckpt import CheckpointManager
from tests.distributed.test_sharded_fsdp import assert_same, build, components, full
from tests.helpers.spawn import run_ranks


def build_2d(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 8), torch.nn.Linear(8, 3))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"2": ColwiseParallel(), "3": RowwiseParallel()})
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _save_2d(rank: int, world_size: int, out: str) -> dict | None:
    model, optimizer = build_2d(0)
    gen = torch.Generator().manual_seed(100 + rank // 2)  # the same batch on both TP ranks of a replica
    for _ in range(2):
        model(torch.randn(4, 6, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with CheckpointManager(out, components(model, optimizer)) as manager:
        manager.save(2).wait()
    tensors = full(model, optimizer)
    return tensors if rank == 0 else None


def _load(rank: int, world_size: int, path: str, shard: bool) -> dict | None:
    model, optimizer = build(1, world_size, shard)
    with CheckpointManager(Path(path).parent, components(model, optimizer)) as manager:
        assert manager.load(path).loaded == ["model", "optimizer"]
    tensors = full(model, optimizer)
    return tensors if rank == 0 else None


def test_fsdp_x_tp_to_fsdp_2_and_to_1(tmp_path: Path) -> None:
    saved = run_ranks(_save_2d, 4, str(tmp_path / "2d"), timeout=240)[0]
    ckpt = tmp_path / "2d" / "checkpoint-2"
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    writers = sorted(f["rank"] for f in manifest["files"].values() for c in f["chunks"] if c["fqn"] == "3.bias")
    assert writers == [0, 2]  # Replicate over tp: written once per dp shard, by tp coordinate 0
    total = sum(
        c["range"][1] - c["range"][0]
        for f in manifest["files"].values()
        if f["component"] == "model"
        for c in f["chunks"]
    )
    assert total == sum(
        t.numel() * t.element_size() for n, t in saved.items() if n.startswith("param.")
    )  # the global state once
    assert_same(saved, run_ranks(_load, 2, str(ckpt), True, timeout=240)[0])
    assert_same(saved, run_ranks(_load, 1, str(ckpt), False, timeout=240)[0])
