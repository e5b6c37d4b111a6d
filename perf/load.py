"""Load: time to load and verify a checkpoint, next to reading the same bytes raw.

``python -m perf.load [--mib 512] [--repeat 3]``. One async_ckpt checkpoint (model.safetensors +
optimizer_state.pt) is written, then, cold (the files' pages dropped from the page cache with
``posix_fadvise``) and warm:

* ``raw read``: read every file of the checkpoint into memory (the disk's and page cache's floor);
* ``load, verify``: ``CheckpointManager.load()`` with ``verify_on_load=True`` (sizes and xxh3 of
  every file, parse, ``load_state_dict`` into the live model and optimizer state);
* ``load, no verify``: the same with ``verify_on_load=False`` (sizes only);
* ``safetensors.load_file`` of the model file and ``torch.load`` of the optimizer file, the
  stock readers, for reference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from async_ckpt import CheckpointManager, StateComponent
from perf.common import DTYPES, MiB, TensorDict, bar_plot, evict, median, nbytes, run_and_report, synthetic_state, tensors_of


def read_raw(directory: Path) -> int:
    total = 0
    for path in sorted(directory.iterdir()):
        with open(path, "rb", buffering=0) as f:
            total += len(f.read())
    return total


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, optim = synthetic_state(args.mib * MiB, DTYPES[args.dtype])
    size = nbytes(tensors_of(model) + tensors_of(optim))
    comps = lambda: [StateComponent("model", model, required=True), StateComponent("optimizer", TensorDict(optim))]  # noqa: E731
    with CheckpointManager(root, comps()) as mgr:
        path = mgr.save(1).wait()
    on_disk = sum(p.stat().st_size for p in path.iterdir())
    managers = {verify: CheckpointManager(root, comps(), verify_on_load=verify) for verify in (True, False)}
    methods = {
        "raw read": lambda: read_raw(path),
        "load, verify": lambda: managers[True].load(path),
        "load, no verify": lambda: managers[False].load(path),
        "safetensors.load_file + torch.load": lambda: (safetensors.torch.load_file(str(path / "model.safetensors")),
                                                       torch.load(path / "optimizer_state.pt", weights_only=True)),
    }
    rows = []
    for name, fn in methods.items():
        for cache in ("cold", "warm"):
            times = []
            for _ in range(args.repeat):
                if cache == "cold":
                    evict(path)
                else:
                    read_raw(path)
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            rows.append({"method": name, "cache": cache, "seconds": median(times), "mib_per_s": on_disk / MiB / median(times)})
            print(f"  {name}, {cache}: {1000 * median(times):.0f} ms ({on_disk / MiB / median(times):.0f} MiB/s)", flush=True)
    for mgr in managers.values():
        mgr.close()
    return {"size_mib": round(size / MiB), "on_disk_mib": round(on_disk / MiB), "dtype": args.dtype, "rows": rows}


def table(result: dict[str, Any]) -> str:
    raw = {r["cache"]: r["seconds"] for r in result["rows"] if r["method"] == "raw read"}
    lines = [f"Loading a {result['size_mib']} MiB checkpoint ({result['dtype']}, {result['on_disk_mib']} MiB on disk); ratio to the raw read of the same files:", "",
             "| method | cache | time | MiB/s | / raw read |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['cache']} | {1000 * r['seconds']:.0f} ms | {r['mib_per_s']:.0f} | {r['seconds'] / raw[r['cache']]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    run_and_report(args, "load", run, table, load_plot)


def load_plot(result: dict[str, Any]) -> Any:
    """Bars of MiB/s per method, cold and warm cache."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))

    def draw(path: Path) -> None:
        by = {(r["method"], r["cache"]): r["mib_per_s"] for r in result["rows"]}
        bar_plot(path, f"load throughput, {result['size_mib']} MiB checkpoint", methods, {c: [by.get((m, c)) for m in methods] for c in ("cold", "warm")}, "MiB/s")

    return draw

if __name__ == "__main__":
    main()
