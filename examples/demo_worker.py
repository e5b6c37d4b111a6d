"""One rank of the demo's training job: demo.py starts two of these (rank 0 and 1) per run.

This is the part a user writes: a model, an optimizer, a trainer-progress object and the RNG,
handed to ``async_ckpt.CheckpointManager``; ``mgr.load()`` to resume, ``mgr.save(step)`` every
N steps. Rank 0 reports what happens as JSON lines on stdout, which demo.py reads and prints.

    python demo_worker.py OUT_DIR MODE    # MODE: killed | resumed (both checkpoint) | reference
    env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from async_ckpt import CheckpointManager, SharingPattern, StateComponent, ValidationLevel, rng_component

SEED = 1234
STEPS = 200  # total training steps
SAVE_EVERY = 25  # checkpoint every N steps
KILL_FROM = 150  # demo.py kills the first run during a save at or after this step
BATCH, IN, HIDDEN, CLASSES = 32, 256, 2048, 16  # MLP, 4.8M parameters: ~54 MiB of state with AdamW


class Progress:
    """Trainer progress: the last finished step. Any object with state_dict/load_state_dict works."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)  # same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data stream: a pure function of (seed, step, rank), so a resumed run sees the same batches."""
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(SEED * 1_000_003 + step * 101 + rank)
    x = torch.randn(BATCH, IN, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def report(**event) -> None:
    """Rank 0 tells demo.py what happened (one JSON object per line)."""
    if dist.get_rank() == 0:
        print(json.dumps(event), flush=True)


def torch_save_ms(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> float:
    """The baseline: a synchronous torch.save of the same state, made durable with fsync."""
    path = folder / "torch_save_baseline.pt"
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return 1000 * elapsed


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)  # async_ckpt logs commits at INFO: keep them quiet
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env
    rank = dist.get_rank()

    model = make_model()
    ddp = DistributedDataParallel(model)  # all-reduces gradients: every rank holds the same weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # fused: 4x faster on CPU
    progress = Progress()
    n_params = sum(p.numel() for p in model.parameters())
    report(event="config", params=n_params, steps=STEPS, save_every=SAVE_EVERY, world_size=dist.get_world_size())

    mgr = None
    if mode in ("killed", "resumed"):
        # The components of a checkpoint. Model and optimizer are identical on every rank (DDP), so
        # rank 0 alone writes them; QUICK validation hashes the model on every rank at each save
        # and refuses to save if the replicas have drifted apart. The RNG differs per rank.
        components = [
            StateComponent("model", model, SharingPattern.REPLICATED, required=True, validation=ValidationLevel.QUICK),
            StateComponent("optimizer", optimizer, SharingPattern.GLOBAL, required=True),
            StateComponent("trainer", progress, SharingPattern.GLOBAL, required=True),
            rng_component(),  # PER_RANK: Python, NumPy and torch generators of this rank (dropout!)
        ]
        # Construction is collective; rank 0 removes what crashed saves left behind.
        mgr = CheckpointManager(out / "checkpoints", components, async_save=True, save_total_limit=3, timeout_s=60)

    torch.manual_seed(SEED + 1 + rank)  # the dropout stream: different on each rank
    if mgr is not None:
        resumed = mgr.load()  # newest committed checkpoint that verifies; None on a fresh start
        mgr.prepare()  # allocate staging buffers now, not in the first save() (AdamW's moments
        #                only exist after its first step, so a fresh run's first save still allocates them)
        report(event="start", resumed_step=resumed and resumed.step, resumed_path=resumed and resumed.path.name,
               leftovers=sorted(p.name for p in mgr.output_dir.glob(".checkpoint-*.staging-*")))

    loss = torch.tensor(0.0)
    for step in range(progress.step + 1, STEPS + 1):
        x, y = batch(step, rank)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step = step
        if mgr is None or step % SAVE_EVERY != 0:
            continue
        # The save: returns once the state is copied (the stall); files are written in the background.
        handle = mgr.save(step)
        stall_ms = 1000 * handle.timings["stall_s"]
        if mode == "killed" and step >= KILL_FROM:
            # demo.py SIGKILLs both ranks now, while this save is still being written.
            report(event="in_flight", step=step, stall_ms=stall_ms)
            continue
        if rank == 0:
            handle.wait()  # (only so that the torch.save measurement does not share the disk)
            report(event="save", step=step, loss=loss.item(), stall_ms=stall_ms,
                   torch_save_ms=torch_save_ms(model, optimizer, out), path=handle.path.name)

    if mgr is not None:
        mgr.close()  # drains the last save
    if rank == 0:
        torch.save(model.state_dict(), out / "final_params.pt")
    report(event="done", step=progress.step, loss=loss.item())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
