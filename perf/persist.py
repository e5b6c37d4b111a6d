"""Persist throughput: bytes per second until a checkpoint is durable, next to a raw write+fsync.

``python -m perf.persist [--mib 512] [--files 2,8] [--threads 1,2,4,8] [--levels 1,3,9]``.

For each layout (``2`` files: model.safetensors + optimizer_state.pt as a trainer writes them;
``8``: the same bytes split over eight components, which is what lets I/O threads run in
parallel) and each ``num_io_threads``, the time from ``save()`` to the committed checkpoint
(serialize, xxh3, write, fsync, manifest, renames) is compared with writing the same bytes from
memory with plain ``os.write`` and ``fsync``: one thread per file, as many files. Then zstd at
each level: bytes on disk over bytes of state (ratio) and MiB of state per second to durable.
The state is random bf16/fp32 data (``--dtype``); real weights compress somewhat better.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

import torch

from async_ckpt import CheckpointManager, StateComponent
from perf.common import DTYPES, MiB, TensorDict, bar_plot, drop_dir, median, nbytes, run_and_report, synthetic_state, tensors_of


def components_for(model: torch.nn.Module, optim: dict, files: int) -> list[StateComponent]:
    if files <= 2:
        return [StateComponent("model", model, required=True), StateComponent("optimizer", TensorDict(optim))]
    tensors = {f"t{i}": t for i, t in enumerate(tensors_of(model) + tensors_of(optim)) if t.dim()}
    names = sorted(tensors, key=lambda n: int(n[1:]))
    shards = [dict((n, tensors[n]) for n in names[i::files]) for i in range(files)]
    return [StateComponent(f"shard{i}", TensorDict(s), file_format="safetensors") for i, s in enumerate(shards)]


def time_to_durable(root: Path, comps: list[StateComponent], threads: int, repeat: int, codec: str | None = None, level: int = 1) -> tuple[float, int]:
    """Median seconds from save() to commit over ``repeat`` saves (after one warm-up), and bytes on disk."""
    times = []
    with CheckpointManager(root / "ckpt", comps, num_io_threads=threads, compression=codec, compression_level=level, save_total_limit=1) as mgr:
        mgr.prepare()
        for step in range(repeat + 1):
            started = time.perf_counter()
            path = mgr.save(step).wait()
            times.append(time.perf_counter() - started)
        on_disk = sum(p.stat().st_size for p in path.iterdir())
    drop_dir(root / "ckpt")
    return median(times[1:]), on_disk


def raw_write(root: Path, groups: list[list[torch.Tensor]], repeat: int) -> float:
    """Plain os.write of each group's bytes to its own file, one thread per file, fsync each."""

    def one(item: tuple[int, list[torch.Tensor]]) -> None:
        fd = os.open(root / f"raw{item[0]}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in item[1]:
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                while len(view):
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
            list(pool.map(one, enumerate(groups)))
        times.append(time.perf_counter() - started)
    for i in range(len(groups)):
        (root / f"raw{i}.bin").unlink(missing_ok=True)
    return median(times[1:])


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, optim = synthetic_state(args.mib * MiB, DTYPES[args.dtype])
    size = nbytes(tensors_of(model) + tensors_of(optim))
    rows = []
    for files in args.files:
        comps = components_for(model, optim, files)
        groups = [tensors_of(c.stateful.state_dict() if not isinstance(c.stateful, torch.nn.Module) else c.stateful) for c in comps]
        raw = raw_write(root, groups, args.repeat)
        for threads in args.threads:
            seconds, _ = time_to_durable(root, comps, threads, args.repeat)
            rows.append({"files": files, "threads": threads, "durable_s": seconds, "raw_s": raw, "mib_per_s": size / MiB / seconds, "raw_mib_per_s": size / MiB / raw})
            print(f"  {files} files, {threads} io threads: {size / MiB / seconds:.0f} MiB/s vs raw {size / MiB / raw:.0f} MiB/s ({seconds / raw:.2f}x)", flush=True)
    zstd_rows = []
    comps = components_for(model, optim, max(args.files))
    threads = max(args.threads)
    for level in args.levels:
        seconds, on_disk = time_to_durable(root, comps, threads, max(1, args.repeat - 1), "zstd", level)
        zstd_rows.append({"level": level, "files": max(args.files), "threads": threads, "durable_s": seconds, "ratio": on_disk / size, "mib_per_s": size / MiB / seconds})
        print(f"  zstd {level}: ratio {on_disk / size:.3f}, {size / MiB / seconds:.0f} MiB/s", flush=True)
    return {"size_mib": round(size / MiB), "dtype": args.dtype, "rows": rows, "zstd": zstd_rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"Time to durable commit of {result['size_mib']} MiB ({result['dtype']}) against a raw write+fsync of the same bytes (one thread per file):", "",
             "| files | io threads | durable | MiB/s | raw write+fsync | raw MiB/s | durable / raw |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['files']} | {r['threads']} | {1000 * r['durable_s']:.0f} ms | {r['mib_per_s']:.0f} | {1000 * r['raw_s']:.0f} ms | {r['raw_mib_per_s']:.0f} | {r['durable_s'] / r['raw_s']:.2f}x |")
    lines += ["", "zstd (state MiB per second to durable; ratio = bytes on disk / bytes of state):", "", "| level | files | io threads | durable | MiB/s | ratio |", "|---|---|---|---|---|---|"]
    for r in result["zstd"]:
        lines.append(f"| {r['level']} | {r['files']} | {r['threads']} | {1000 * r['durable_s']:.0f} ms | {r['mib_per_s']:.0f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> Any:
    def draw(path: Path) -> None:
        threads = sorted({r["threads"] for r in result["rows"]})
        series: dict[str, list[float | None]] = {}
        for files in sorted({r["files"] for r in result["rows"]}):
            by = {r["threads"]: r for r in result["rows"] if r["files"] == files}
            series[f"async_ckpt, {files} files"] = [by[t]["mib_per_s"] if t in by else None for t in threads]
            series[f"raw write+fsync, {files} files"] = [by[t]["raw_mib_per_s"] if t in by else None for t in threads]
        bar_plot(path, f"persist throughput, {result['size_mib']} MiB", [f"{t} io threads" for t in threads], series, "MiB/s to durable")

    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--files", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8])
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 9])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    run_and_report(args, "persist", run, table, plot)


if __name__ == "__main__":
    main()
