"""Overlap mode in a training loop: does copying during forward/backward shorten the saving step?

``python -m perf.snapshot_overlap [--width 512 --layers 4] [--steps 60] [--every 4]``: a small
transformer LM trained by a plain loop with ``torch.set_num_threads(--threads)`` (default 1),
checkpointed with ``CheckpointManager`` three ways, each in the same process on the same model:

* ``none``: no saves (baseline step time);
* ``save``: ``mgr.save(step)`` after the optimizer step (the copy blocks the training thread);
* ``overlap``: ``mgr.save(step, overlap=True)`` after the optimizer step, the copy runs on a
  helper thread during the next forward/backward, ``mgr.wait_snapshot()`` before that step's
  optimizer step.

Reported per mode: the median and p99 step time of steps with no save, the training thread's
blocked time per save (``save()`` plus ``wait_snapshot()``), and the extra time of a saving
step: (save() + the following step) minus the median quiet step, i.e. what a save costs the loop.
The persist-phase slowdown (steps while a save is written) is measured by perf/overlap.py.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from async_ckpt import CheckpointManager, StateComponent
from perf.common import bar_plot, machine, median, percentile, write_results

VOCAB, SEQ = 2000, 64


class LM(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


def train(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LM(args.width, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    data = torch.randint(0, VOCAB, (args.batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    comps = [StateComponent("model", model, required=True), StateComponent("optimizer", opt)]
    mgr = CheckpointManager(root / mode, comps, save_total_limit=1) if mode != "none" else None
    step_times, blocked, saving_steps = [], [], []
    pending_blocked = 0.0
    save_started: float | None = None
    for step in range(args.steps):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(data[:, :-1]).reshape(-1, VOCAB), data[:, 1:].reshape(-1))
        loss.backward()
        if mgr is not None:
            waited = time.perf_counter()
            mgr.wait_snapshot()
            pending_blocked += time.perf_counter() - waited
        opt.step()
        opt.zero_grad(set_to_none=True)
        ended = time.perf_counter()
        if save_started is not None:  # the step after a save: its save() plus this step
            saving_steps.append(ended - save_started)
            blocked.append(pending_blocked)
            save_started = None
        else:
            step_times.append(ended - started)
        pending_blocked = 0.0
        if mgr is not None and step >= 2 and step % args.every == 0 and step < args.steps - 1:
            if not saving_steps and save_started is None and not blocked:
                mgr.prepare()  # once, after AdamW created its state
            mgr.wait()  # the previous save is durable: what is measured here is the snapshot, not the disk
            save_started = time.perf_counter()
            mgr.save(step, overlap=(mode == "overlap"))
            pending_blocked = time.perf_counter() - save_started
    if mgr is not None:
        mgr.close()
    quiet = median(step_times[3:])
    return {"mode": mode, "quiet_median_s": quiet, "quiet_p99_s": percentile(step_times[3:], 99), "saves": len(blocked),
            "blocked_median_s": median(blocked) if blocked else 0.0, "saving_step_extra_s": (median(saving_steps) - quiet) if saving_steps else 0.0}


def table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"Model width {info['width']}, {info['layers']} layers: {info['params'] / 1e6:.1f} M parameters, checkpoint {info['ckpt_mib']:.0f} MiB; "
             f"batch {info['batch']} x {SEQ} tokens; torch threads {info['threads']}; a save every {info['every']} steps.", "",
             "| mode | quiet step median | quiet step p99 | saves | training thread blocked per save (median) | extra time of a saving step (median) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {1000 * r['quiet_median_s']:.1f} ms | {1000 * r['quiet_p99_s']:.1f} ms | {r['saves']} | "
                     f"{1000 * r['blocked_median_s']:.1f} ms | {1000 * r['saving_step_extra_s']:+.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="modes run interleaved this many times; medians of the rounds")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model = LM(args.width, args.layers)
    params = sum(p.numel() for p in model.parameters())
    info = {"width": args.width, "layers": args.layers, "params": params, "ckpt_mib": 3 * params * 4 / 2**20, "batch": args.batch,
            "threads": args.threads, "every": args.every}
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "save": [], "overlap": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(train(mode, args, Path(tmp)))
                print(table(runs[mode][-1:], info).splitlines()[-1], flush=True)
    rows = [{k: (median([r[k] for r in rs]) if isinstance(rs[0][k], float) else rs[0][k]) for k in rs[0]} for rs in runs.values()]
    text = table(rows, info)
    print(text)

    def draw(path: Path) -> None:
        bar_plot(path, "what a save costs the training loop", [r["mode"] for r in rows],
                 {"thread blocked per save": [1000 * r["blocked_median_s"] for r in rows],
                  "extra time of the saving step": [1000 * r["saving_step_extra_s"] for r in rows],
                  "quiet step": [1000 * r["quiet_median_s"] for r in rows]}, "ms")

    write_results(args.out, "snapshot_overlap", {"machine": machine(), "settings": info, "rows": rows, "runs": runs}, text, draw)


if __name__ == "__main__":
    main()
