"""FSDP2 on 4 gloo ranks: save stall and load time of a SHARDED async_ckpt save against DCP.

``python -m perf.sharded_vs_dcp --ranks 4 --width 1024 --layers 8 --repeat 3``: one process
group per run; each rank builds the same FSDP2 MLP with AdamW state, then, alternating, times

* async_ckpt: ``manager.save(step)`` returning (the stall: local shards into the staging pool),
  ``handle.wait()`` (until committed), and ``manager.load(path)`` into a fresh model and
  optimizer (ranged chunk reads, verified);
* DCP: ``dcp.async_save(get_state_dict(...))`` returning, ``future.result()``, and
  ``dcp.load`` + ``set_state_dict`` into a fresh model and optimizer.

Medians over ``--repeat`` per rank, max over ranks; results to perf/results/sharded_vs_dcp.json
and .md. On a shared 2-core machine single numbers move a lot: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers.spawn import run_ranks

RESULTS = Path(__file__).resolve().parent / "results"


def _build(world: int, width: int, layers: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer


def _step(model, optimizer, width: int) -> None:
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _bench(rank: int, world: int, width: int, layers: int, repeat: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from async_ckpt import CheckpointManager, SharingPattern, StateComponent
    from async_ckpt.optim_state import OptimizerState

    def comps(model, optimizer):
        return [
            StateComponent("model", model, sharing_pattern=SharingPattern.SHARDED, required=True),
            StateComponent("optimizer", OptimizerState(model, optimizer), sharing_pattern=SharingPattern.SHARDED),
        ]

    model, optimizer = _build(world, width, layers, 0)
    _step(model, optimizer, width)
    fresh_model, fresh_optimizer = _build(world, width, layers, 1)
    times: dict[str, list[float]] = {
        k: [] for k in ("ours_stall", "ours_commit", "ours_load", "dcp_stall", "dcp_commit", "dcp_load")
    }
    manager = CheckpointManager(Path(root) / "ours", comps(model, optimizer))
    loader = CheckpointManager(
        Path(root) / "loader", comps(fresh_model, fresh_optimizer)
    )  # one manager per run directory
    manager.prepare()
    for i in range(repeat + 1):  # the first round allocates buffers and warms caches: dropped
        dist.barrier()
        t0 = time.perf_counter()
        handle = manager.save(i)
        t1 = time.perf_counter()
        handle.wait()
        t2 = time.perf_counter()
        dist.barrier()
        t3 = time.perf_counter()
        loader.load(handle.path)
        t4 = time.perf_counter()
        dist.barrier()
        path = f"{root}/dcp/step-{i}"
        t5 = time.perf_counter()
        msd, osd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path)
        t6 = time.perf_counter()
        future.result()
        t7 = time.perf_counter()
        dist.barrier()
        t8 = time.perf_counter()
        msd, osd = get_state_dict(fresh_model, fresh_optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(fresh_model, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        t9 = time.perf_counter()
        if i:
            for key, value in zip(times, (t1 - t0, t2 - t0, t4 - t3, t6 - t5, t7 - t5, t9 - t8)):
                times[key].append(value)
    manager.close()
    loader.close()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        per_rank = run_ranks(_bench, args.ranks, args.width, args.layers, args.repeat, root, timeout=1200)
    worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    state_mib = args.layers * (args.width * args.width + args.width) * 4 * 3 / 2**20  # params + 2 moments
    result = {
        "ranks": args.ranks,
        "width": args.width,
        "layers": args.layers,
        "repeat": args.repeat,
        "state_mib": state_mib,
        "seconds_max_over_ranks": worst,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sharded_vs_dcp.json").write_text(json.dumps(result, indent=2))
    rows = [
        ("save stall (save() returns)", "ours_stall", "dcp_stall"),
        ("save until committed", "ours_commit", "dcp_commit"),
        ("load into a fresh model + optimizer", "ours_load", "dcp_load"),
    ]
    lines = [
        f"FSDP2, {args.ranks} gloo ranks, {args.layers} x Linear({args.width}, {args.width}) + AdamW: "
        f"{state_mib:.0f} MiB of state; median of {args.repeat}, slowest rank",
        "",
        "| | async_ckpt SHARDED (ms) | DCP async_save / load (ms) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {1000 * worst[a]:.1f} | {1000 * worst[b]:.1f} |" for label, a, b in rows]
    (RESULTS / "sharded_vs_dcp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
