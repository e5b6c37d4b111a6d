"""Save stall side by side: copy floor, async_ckpt (first and steady), torch.save, safetensors.

``python -m perf.stall --sizes 64,512 --repeat 3`` (MiB of model + AdamW state). Stall is the
time the training thread is blocked by a save; "durable" is the time until the bytes are
fsynced (for async_ckpt: until the checkpoint is committed). Everything is measured in one run,
one method after another on the same state, and reported as ratios to the copy floor.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from async_ckpt import CheckpointManager, StateComponent
from perf.common import MiB, TensorDict, drop_dir, fsync_path, machine, median, nbytes, synthetic_state, tensors_of, timed, write_results


def floor(state: list[torch.Tensor], buffers: list[torch.Tensor]) -> float:
    """The least a snapshot can cost: ``copy_`` into buffers that already exist."""
    return timed(lambda: [b.copy_(t) for b, t in zip(buffers, state)])


def bench_async_ckpt(root: Path, model: dict, optim: dict, repeat: int, prepare: bool, floor_pair: tuple[list, list]) -> dict[str, Any]:
    """async_ckpt's stall and time to commit; also the copy floor measured right after each commit.

    A save writes hundreds of MiB through the page cache, which leaves CPU caches and TLBs
    cold; the floor copy measured at the same point of the loop is the fair comparison.
    """
    comps = [StateComponent("model", TensorDict(model), required=True), StateComponent("optimizer", TensorDict(optim))]
    stalls, durable, floors = [], [], []
    with CheckpointManager(root / "async_ckpt", comps, save_total_limit=1) as mgr:
        first_started = time.perf_counter()
        if prepare:
            mgr.prepare()
        prepare_s = time.perf_counter() - first_started
        for step in range(repeat + 1):
            started = time.perf_counter()
            handle = mgr.save(step)
            stalls.append(time.perf_counter() - started)
            handle.wait()
            durable.append(time.perf_counter() - started)
            floors.append(floor(*floor_pair))
    return {"first_stall_s": stalls[0], "steady_stall_s": median(stalls[1:]), "durable_s": median(durable[1:]), "prepare_s": prepare_s,
            "floor_after_write_s": median(floors[:-1])}


def bench_torch_save(root: Path, model: dict, optim: dict, repeat: int) -> float:
    path = root / "torch_save.pt"

    def save() -> None:
        torch.save({"model": model, "optimizer": optim}, path)
        fsync_path(path)

    return median([timed(save) for _ in range(repeat)])


def bench_safetensors(root: Path, model: dict, optim: dict, repeat: int) -> float:
    flat = dict(model)
    flat.update({f"opt.{i}.{k}": v for i, s in optim["state"].items() for k, v in s.items() if v.dim()})
    path = root / "model.safetensors"

    def save() -> None:
        safetensors.torch.save_file(flat, str(path))
        fsync_path(path)

    return median([timed(save) for _ in range(repeat)])


def bench_raw_write(root: Path, tensors: list[torch.Tensor], repeat: int) -> float:
    """Write the same bytes with os-level writes and one fsync: the disk's floor."""
    path = root / "raw.bin"

    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for t in tensors:
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            import os

            os.fsync(f.fileno())

    return median([timed(write) for _ in range(repeat)])


def run(size_mib: int, repeat: int, root: Path) -> dict[str, Any]:
    model, optim = synthetic_state(size_mib * MiB)
    tensors = tensors_of(model) + tensors_of(optim)
    buffers = [torch.empty_like(t) for t in tensors]
    floor(tensors, buffers)  # touch the pages once
    floor_s = median([floor(tensors, buffers) for _ in range(max(3, repeat))])
    cold = bench_async_ckpt(root, model, optim, repeat, prepare=False, floor_pair=(tensors, buffers))
    drop_dir(root / "async_ckpt")
    warm = bench_async_ckpt(root, model, optim, repeat, prepare=True, floor_pair=(tensors, buffers))
    drop_dir(root / "async_ckpt")
    row = {
        "size_mib": round(nbytes(model) / MiB + nbytes(optim) / MiB),
        "floor_s": warm["floor_after_write_s"],
        "floor_back_to_back_s": floor_s,
        "async_first_s": cold["first_stall_s"],
        "async_first_prepared_s": warm["first_stall_s"],
        "prepare_s": warm["prepare_s"],
        "async_steady_s": warm["steady_stall_s"],
        "async_durable_s": warm["durable_s"],
        "torch_save_s": bench_torch_save(root, model, optim, repeat),
        "safetensors_s": bench_safetensors(root, model, optim, repeat),
        "raw_write_fsync_s": bench_raw_write(root, tensors, repeat),
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = "| state | copy floor (b2b) | copy floor | async first | async first (prepared) | async steady | steady / floor | async durable | raw write+fsync | durable / raw | torch.save+fsync | safetensors+fsync |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
        lines.append(
            f"| {r['size_mib']} MiB | {ms(r['floor_back_to_back_s'])} | {ms(r['floor_s'])} | {ms(r['async_first_s'])} | {ms(r['async_first_prepared_s'])} | {ms(r['async_steady_s'])} | "
            f"{r['async_steady_s'] / r['floor_s']:.2f}x | {ms(r['async_durable_s'])} | {ms(r['raw_write_fsync_s'])} | "
            f"{r['async_durable_s'] / r['raw_write_fsync_s']:.2f}x | {ms(r['torch_save_s'])} | {ms(r['safetensors_s'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512", help="state sizes in MiB, comma separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(run(size, args.repeat, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    write_results(args.out, "stall", {"machine": machine(), "rows": rows}, text)


if __name__ == "__main__":
    main()
