"""Host memory of saving: peak extra RSS with one save in flight, and RSS drift over many saves.

``python -m perf.memory [--mib 512] [--saves 50]``. Each method runs in its own fresh process:
the state is built, RSS is read (the baseline), then ``--saves`` saves run back to back as a
training loop would issue them (the next save starts when the previous one let go of its
buffers), with RSS sampled every millisecond by a helper thread. Peak extra = highest RSS minus
the baseline (staging buffers included: they are the snapshot); drift = RSS after the last save
minus RSS after the fifth (warm-up done). Methods: async_ckpt, and DCP ``async_save`` with a
reused stager (fewer saves: ``--dcp-saves``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from perf.common import DTYPES, MiB, TensorDict, bar_plot, machine, nbytes, rss_bytes, synthetic_state, tensors_of, write_results


class Sampler:
    """Highest RSS seen by a thread that polls every ``period`` seconds."""

    def __init__(self, period: float = 0.001) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def child(method: str, mib: int, saves: int, dtype: str, root: Path) -> dict[str, Any]:
    """Runs in a fresh process: baseline, saves, peak and drift."""
    logging.basicConfig(level=logging.WARNING)
    model, optim = synthetic_state(mib * MiB, DTYPES[dtype])
    size = nbytes(tensors_of(model) + tensors_of(optim))
    baseline = rss_bytes()
    sampler = Sampler()
    after: list[int] = []
    started = time.perf_counter()
    if method == "async_ckpt":
        from async_ckpt import CheckpointManager, StateComponent

        comps = [StateComponent("model", model, required=True), StateComponent("optimizer", TensorDict(optim))]
        with CheckpointManager(root, comps, save_total_limit=1) as mgr:
            mgr.prepare()
            for step in range(saves):
                mgr.save(step)
                after.append(rss_bytes())
            mgr.wait()
    else:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        stager = DefaultStager(StagingOptions(False, False, False, False))
        state = {"model": model.state_dict(), "optim": optim}
        future = None
        for step in range(saves):
            if future is not None:
                future.result()  # the reused stager's buffers must be free again
            future = dcp.async_save(state, checkpoint_id=str(root / f"dcp{step % 2}"), async_stager=stager)
            after.append(rss_bytes())
        future.result()
        stager.close()
        dist.destroy_process_group()
    peak = sampler.stop()
    warm = after[min(4, len(after) - 1)]
    return {"method": method, "saves": saves, "state_bytes": size, "baseline_rss": baseline, "peak_rss": peak,
            "peak_extra_bytes": peak - baseline, "peak_extra_ratio": (peak - baseline) / size,
            "rss_after_warmup": warm, "rss_after_last": after[-1], "drift_bytes": after[-1] - warm, "seconds": time.perf_counter() - started}


def run_child(method: str, args: argparse.Namespace, saves: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cmd = [sys.executable, "-m", "perf.memory", "--child", method, "--mib", str(args.mib), "--saves", str(saves), "--dtype", args.dtype, "--dir", tmp]
        root = str(Path(__file__).resolve().parent.parent)  # so that -m perf.memory resolves from any directory
        env = {**os.environ, "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | state | saves | peak extra RSS | peak extra / state | RSS drift (save 5 to last) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['state_bytes'] / MiB:.0f} MiB | {r['saves']} | {r['peak_extra_bytes'] / MiB:.0f} MiB | {r['peak_extra_ratio']:.3f}x | {r['drift_bytes'] / MiB:+.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--saves", type=int, default=50)
    parser.add_argument("--dcp-saves", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--methods", default="async_ckpt,dcp_async_reused")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.child:
        print(json.dumps(child(args.child, args.mib, args.saves, args.dtype, args.dir)))
        return
    rows = []
    for method in args.methods.split(","):
        rows.append(run_child(method, args, args.saves if method == "async_ckpt" else args.dcp_saves))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)

    def draw(path: Path) -> None:
        bar_plot(path, f"peak extra RSS over state size ({rows[0]['state_bytes'] / MiB:.0f} MiB)", [r["method"] for r in rows],
                 {"peak extra / state": [r["peak_extra_ratio"] for r in rows]}, "x state size", hline=1.15)

    write_results(args.out, "memory", {"machine": machine(args.dir), "mib": args.mib, "rows": rows}, text, draw)


if __name__ == "__main__":
    main()
