"""Save stall side by side: copy floor, async_ckpt, torch.save, safetensors, DCP save and async_save.

``python -m perf.stall`` (default sizes 64, 512, 2048 MiB of model + AdamW state),
``--sizes 4096`` for the big one, ``--params 1e9 --dtype bf16`` for a model of that many
parameters (plus AdamW's two moments in the same dtype), ``--lora 0.9`` for a LoRA-style table
where 90% of the model is frozen, ``--device cuda`` on a GPU machine (pinned device-to-host).

Stall is the time the training thread is blocked by a save; "durable" is the time from the call
until the bytes are fsynced (async_ckpt: committed; DCP: its future resolved). Every method runs
in one process on the same state, one after another, ``--repeat`` steady saves after a first one.
The copy floor is ``copy_`` into preallocated buffers (pinned, non-blocking, then synchronised on
CUDA), measured back to back and right after each save became durable: a save streams the
checkpoint through the page cache, which leaves CPU caches and TLBs cold, so "floor after write"
is the fair comparison for a steady-state stall. DCP runs in a single-process gloo group.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from async_ckpt import CheckpointManager, StateComponent
from perf.common import (
    cpu_pressure_avg10, wait_quiet, DTYPES, MiB, TensorDict, bar_plot, drop_dir, fsync_path, machine, median, ms, nbytes, params_to_bytes,
    synthetic_state, tensors_of, timed, write_results,
)

Waiter = Callable[[], Any]


class Floor:
    """``copy_`` of every tensor into buffers allocated once (pinned on CUDA)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.cuda = any(t.is_cuda for t in tensors)
        self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda) for t in tensors]
        self.measure()

    def measure(self) -> float:
        started = time.perf_counter()
        for buffer, tensor in zip(self.buffers, self.tensors):
            buffer.copy_(tensor, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started


class Method:
    """One way of saving, kept open across rounds: ``save(i)`` returns a callable that waits until durable."""

    def __init__(self, save: Callable[[int], Waiter], close: Callable[[], None] = lambda: None, prepare_s: float = 0.0,
                 cleanup: Callable[[], None] = lambda: None) -> None:
        self.save, self.close, self.prepare_s, self.cleanup = save, close, prepare_s, cleanup
        self.stalls: list[float] = []
        self.durables: list[float] = []
        self.floors: list[float] = []
        self.extra: dict[str, Any] = {}

    def once(self, index: int, floor: Floor) -> None:
        started = time.perf_counter()
        wait = self.save(index)
        self.stalls.append(time.perf_counter() - started)
        wait()
        self.durables.append(time.perf_counter() - started)
        self.floors.append(floor.measure())
        self.cleanup()  # untimed: delete what this save wrote, so no method pays for deleting files
        os.sync()  # and let the file system finish the deletion before anyone is timed again

    def result(self) -> dict[str, Any]:
        steady = self.stalls[1:] or self.stalls
        return {"first_stall_s": self.stalls[0], "steady_stall_s": median(steady), "durable_s": median(self.durables[1:] or self.durables),
                "best_stall_s": min(steady), "best_durable_s": min(self.durables[1:] or self.durables),
                "floor_after_write_s": median(self.floors), "best_floor_after_write_s": min(self.floors), "paired_ratio": median([s / f for s, f in zip(self.stalls[1:], self.floors[1:])] or [0.0]),
                "prepare_s": self.prepare_s, "stalls_s": self.stalls, "durables_s": self.durables, "floors_s": self.floors, **self.extra}


def sync_method(fn: Callable[[int], None], path: Path) -> Method:
    def save(index: int) -> Waiter:
        fn(index)
        return lambda: None

    remove = lambda: path.unlink(missing_ok=True)  # noqa: E731
    return Method(save, remove, cleanup=remove)


# ------------------------------------------------------------------------------------ methods


def open_async_ckpt(root: Path, model: torch.nn.Module, optim: dict, *, prepare: bool, incremental: bool = False, name: str = "async_ckpt", io_threads: int | None = None) -> Method:
    comps = [StateComponent("model", model, required=True), StateComponent("optimizer", TensorDict(optim))]
    kwargs: dict[str, Any] = {"incremental": ["model"]} if incremental else {}
    if io_threads is not None:
        kwargs["num_io_threads"] = io_threads
    mgr = CheckpointManager(root / name, comps, **kwargs)  # no retention thread: cleanup() deletes, untimed
    prepare_s = timed(mgr.prepare) if prepare else 0.0
    method = Method(lambda i: mgr.save(i).wait, prepare_s=prepare_s, cleanup=lambda: [drop_dir(p) for p in (root / name).glob("checkpoint-*")])

    def close() -> None:
        method.extra["bytes_skipped_last"] = mgr._pool.stats.bytes_skipped
        mgr.close()
        drop_dir(root / name)

    method.close = close
    return method


def open_torch_save(root: Path, state: dict) -> Method:
    path = root / "torch_save.pt"

    def save(index: int) -> None:
        torch.save(state, path)
        fsync_path(path)

    return sync_method(save, path)


def open_safetensors(root: Path, model: torch.nn.Module, optim: dict) -> Method:
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    flat.update({f"opt.{i}.{k}": v for i, s in optim["state"].items() for k, v in s.items()})
    path = root / "model.safetensors"

    def save(index: int) -> None:
        safetensors.torch.save_file(flat, str(path))
        fsync_path(path)

    return sync_method(save, path)


def open_raw_write(root: Path, tensors: list[torch.Tensor]) -> Method:
    """The same bytes with plain writes from host memory and one fsync: the disk's floor."""
    path = root / "raw.bin"
    host = [t.cpu() for t in tensors]

    def save(index: int) -> None:
        with open(path, "wb", buffering=0) as f:
            for t in host:
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            os.fsync(f.fileno())

    return sync_method(save, path)


def open_dcp(root: Path, state: dict, mode: str) -> Method:
    """``dcp.save`` (mode "save") or ``dcp.async_save``: "default", "reused" stager, "pinned" reused, "cached" blocking stager."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

    stager: Any = None
    if mode == "reused":
        stager = DefaultStager(StagingOptions(False, False, False, False))
    elif mode == "pinned":
        stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=True))
    elif mode == "cached":
        stager = BlockingAsyncStager(cache_staged_state_dict=True)
    previous: list[Path] = []

    def save(index: int) -> Waiter:
        path = root / f"dcp_{mode}_{index}"
        previous[:] = [path]
        if mode == "save":
            dcp.save(state, checkpoint_id=str(path))
            return lambda: None
        kwargs = {"async_stager": stager} if stager is not None else {}
        return dcp.async_save(state, checkpoint_id=str(path), **kwargs).result

    def cleanup() -> None:
        for old in previous:
            drop_dir(old)

    def close() -> None:
        if stager is not None:
            stager.close()
        cleanup()

    return Method(save, close, cleanup=cleanup)


# ------------------------------------------------------------------------------------ one size

METHODS = ["async_ckpt", "async_ckpt_cold", "torch_save", "safetensors", "raw_write", "dcp_save", "dcp_async_default", "dcp_async_reused"]
CUDA_METHODS = ["dcp_async_pinned", "dcp_async_cached"]
LORA_METHODS = ["async_ckpt", "async_ckpt_incremental", "dcp_async_reused"]
IO_METHODS = {f"async_ckpt_io{n}": n for n in (1, 2, 4)}  # async_ckpt with that many I/O threads (default: cores - 1, 1 to 4)


def open_method(name: str, root: Path, model: torch.nn.Module, optim: dict, tensors: list[torch.Tensor]) -> Method:
    state = {"model": model.state_dict(), "optim": optim}
    if name == "async_ckpt":
        return open_async_ckpt(root, model, optim, prepare=True)
    if name == "async_ckpt_cold":
        return open_async_ckpt(root, model, optim, prepare=False, name=name)
    if name == "async_ckpt_incremental":
        return open_async_ckpt(root, model, optim, prepare=True, incremental=True, name=name)
    if name in IO_METHODS:
        return open_async_ckpt(root, model, optim, prepare=True, name=name, io_threads=IO_METHODS[name])
    if name == "torch_save":
        return open_torch_save(root, state)
    if name == "safetensors":
        return open_safetensors(root, model, optim)
    if name == "raw_write":
        return open_raw_write(root, tensors)
    if name.startswith("dcp_"):
        return open_dcp(root, state, name.rsplit("_", 1)[-1])
    raise ValueError(f"unknown method {name!r}")


def measure(methods: list[str], repeat: int, root: Path, model: torch.nn.Module, optim: dict, floor: Floor, interleave: bool, quiet: float = 0.0) -> dict[str, dict[str, Any] | None]:
    """``repeat + 1`` saves per method; interleaved (one save of each method per round) so that a
    shared machine's changing load falls on every method alike, or one method after another
    (less memory: one method's buffers at a time)."""
    results: dict[str, dict[str, Any] | None] = {}
    tensors = floor.tensors

    def run_one(name: str, opened: Method) -> None:
        try:
            for index in range(repeat + 1):
                opened.once(index, floor)
        finally:
            opened.close()

    if not interleave:
        for name in methods:
            try:
                opened = open_method(name, root, model, optim, tensors)
                run_one(name, opened)
                results[name] = opened.result()
            except Exception as exc:  # e.g. BlockingAsyncStager needs an accelerator to pin
                logging.warning("%s: %s: %s", name, type(exc).__name__, exc)
                results[name] = None
        return results
    live: dict[str, Method] = {}
    for name in methods:
        try:
            live[name] = open_method(name, root, model, optim, tensors)
        except Exception as exc:
            logging.warning("%s: %s: %s", name, type(exc).__name__, exc)
            results[name] = None
    for index in range(repeat + 1):
        wait_quiet(quiet)
        order = list(live)
        order = order[index % len(order):] + order[: index % len(order)]  # rotate: nobody always follows the same method
        for name in order:
            if name not in live:
                continue
            try:
                live[name].once(index, floor)
            except Exception as exc:
                logging.warning("%s: %s: %s", name, type(exc).__name__, exc)
                live.pop(name).close()
                results[name] = None
    for name, opened in live.items():
        opened.close()
        results[name] = opened.result()
    return {name: results.get(name) for name in methods}


def run(size_mib: float, repeat: int, root: Path, dtype: torch.dtype, device: str, methods: list[str], interleave: bool, frozen: float = 0.0, quiet: float = 0.0) -> dict[str, Any]:
    model, optim = synthetic_state(int(size_mib * MiB), dtype, frozen_fraction=frozen)
    if device != "cpu":
        model = model.to(device)
        optim = _to(optim, device)
    tensors = tensors_of(model) + tensors_of(optim)
    floor = Floor(tensors)
    row: dict[str, Any] = {"size_mib": round(nbytes(tensors) / MiB), "dtype": str(dtype).replace("torch.", ""), "device": device, "tensors": len(tensors), "frozen": frozen}
    row["cpu_pressure_start"] = wait_quiet(quiet)
    row["floor_back_to_back_s"] = median([floor.measure() for _ in range(max(5, repeat))])
    results = measure(methods, repeat, root, model, optim, floor, interleave, quiet)
    row["cpu_pressure_end"] = cpu_pressure_avg10()
    for method, r in results.items():
        print(f"  {row['size_mib']} MiB {method}: " + (f"stall {ms(r['steady_stall_s'])}, durable {ms(r['durable_s'])}" if r else "n/a"), flush=True)
    row["floor_after_write_s"] = median([f for r in results.values() if r for f in r["floors_s"]])
    row["best_floor_after_write_s"] = min(f for r in results.values() if r for f in r["floors_s"])
    row["methods"] = results
    return row


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------ output

LABELS = {
    "async_ckpt": "async_ckpt steady", "async_ckpt_cold": "async_ckpt (no prepare)", "torch_save": "torch.save+fsync",
    "safetensors": "safetensors+fsync", "raw_write": "raw write+fsync", "dcp_save": "DCP save", "dcp_async_default": "DCP async_save",
    "dcp_async_reused": "DCP async_save reused stager", "dcp_async_pinned": "DCP async_save pinned stager",
    "dcp_async_cached": "DCP BlockingAsyncStager(cache)", "async_ckpt_incremental": "async_ckpt incremental",
    **{name: f"async_ckpt, {n} io thread{'s' if n > 1 else ''}" for name, n in IO_METHODS.items()},
}


def _stall(row: dict[str, Any], method: str, best: bool = False) -> float | None:
    r = row["methods"].get(method)
    return None if r is None else r["best_stall_s" if best else "steady_stall_s"]


def _durable(row: dict[str, Any], method: str, best: bool = False) -> float | None:
    r = row["methods"].get(method)
    return None if r is None else r["best_durable_s" if best else "durable_s"]


def _floor(row: dict[str, Any], best: bool = False) -> float:
    return row["best_floor_after_write_s" if best else "floor_after_write_s"]


def table(rows: list[dict[str, Any]]) -> str:
    methods = [m for m in LABELS if any(m in r["methods"] for r in rows)]
    lines = []
    for best in (False, True):
        what = "best of the steady saves (the quietest moment each method got)" if best else "median of the steady saves"
        lines += [f"Stall (training thread blocked), {what}; ratio to the copy floor measured right after a write ({'best' if best else 'median'}):", ""]
        head = "| state | floor b2b | floor after write | " + " | ".join(LABELS[m] for m in methods) + " | CPU pressure start/end |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            cells = []
            for m in methods:
                s = _stall(r, m, best) if m in r["methods"] else None
                cells.append("-" if s is None else f"{ms(s)} ({s / _floor(r, best):.2f}x)")
            pressure = f"{r.get('cpu_pressure_start')}% / {r.get('cpu_pressure_end')}%"
            lines.append(f"| {r['size_mib']} MiB {r['dtype']} | {ms(r['floor_back_to_back_s'])} | {ms(_floor(r, best))} | " + " | ".join(cells) + f" | {pressure} |")
        lines.append("")
    if any("async_ckpt" in r["methods"] for r in rows):
        lines += ["First save (ratio to the median floor after a write) and time to durable, median (best), ratio to a raw write+fsync of the same bytes:", ""]
        durable_methods = [m for m in methods if m != "async_ckpt_cold"]
        head = "| state | async first (no prepare) | async first (prepared) | prepare() | " + " | ".join(f"{LABELS[m]}" for m in durable_methods) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            cold, warm = r["methods"].get("async_ckpt_cold"), r["methods"].get("async_ckpt")
            cells = []
            for m in durable_methods:
                d, b = (_durable(r, m), _durable(r, m, True)) if m in r["methods"] else (None, None)
                raw, raw_best = _durable(r, "raw_write"), _durable(r, "raw_write", True)
                cells.append("-" if d is None else f"{ms(d)} ({d / raw:.2f}x); best {ms(b)} ({b / raw_best:.2f}x)" if raw else ms(d))
            floor = r["floor_after_write_s"]
            first = lambda x: "-" if x is None else f"{ms(x['first_stall_s'])} ({x['first_stall_s'] / floor:.2f}x)"  # noqa: E731
            lines.append(f"| {r['size_mib']} MiB | {first(cold)} | {first(warm)} | {ms(warm['prepare_s']) if warm else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lora_table(rows: list[dict[str, Any]]) -> str:
    lines = ["LoRA-style state (that share of the model's layers frozen, without optimizer state); steady stall, median (best), ratio to the full copy floor after a write:", "",
             "| state | frozen | floor after write | async_ckpt | async_ckpt incremental | DCP async_save reused stager | incremental / DCP (median, best) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, fb = _floor(r), _floor(r, True)
        cell = lambda m: "-" if _stall(r, m) is None else f"{ms(_stall(r, m))} ({_stall(r, m) / f:.2f}x); {ms(_stall(r, m, True))} ({_stall(r, m, True) / fb:.2f}x)"  # noqa: E731
        inc, dcp_s = _stall(r, "async_ckpt_incremental"), _stall(r, "dcp_async_reused")
        ratio = f"{inc / dcp_s:.2f}x, {_stall(r, 'async_ckpt_incremental', True) / _stall(r, 'dcp_async_reused', True):.2f}x" if inc and dcp_s else "-"
        lines.append(f"| {r['size_mib']} MiB {r['dtype']} | {r['frozen']:.0%} | {ms(f)}; {ms(fb)} | {cell('async_ckpt')} | {cell('async_ckpt_incremental')} | {cell('dcp_async_reused')} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], lora_rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        methods = [m for m in LABELS if any(r["methods"].get(m) for r in rows)]
        groups = [f"{r['size_mib']} MiB" for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
        width = 0.8 / (len(methods) + 1)
        for ax, what in zip(axes, ("stall", "durable")):
            for i, m in enumerate(["floor"] + methods):
                xs = [g + (i - len(methods) / 2) * width for g in range(len(rows))]
                if m == "floor":
                    ys = [r["floor_after_write_s"] * 1000 if what == "stall" else None for r in rows]
                else:
                    ys = [(_stall(r, m) if what == "stall" else _durable(r, m)) for r in rows]
                    ys = [None if y is None else 1000 * y for y in ys]
                pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pairs:
                    ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, color=f"C{i % 10}", label="copy floor (after write)" if m == "floor" else LABELS[m])
            ax.set_xticks(range(len(rows)), groups)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log scale)")
            ax.set_title("training thread blocked per save (steady)" if what == "stall" else "time until durable")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        if lora_rows:
            bar_plot(path.with_name(path.stem + "_lora.png"), "LoRA-style: steady stall", [f"{r['size_mib']} MiB, {r['frozen']:.0%} frozen" for r in lora_rows],
                     {"copy floor (after write)": [1000 * r["floor_after_write_s"] for r in lora_rows],
                      **{LABELS[m]: [None if _stall(r, m) is None else 1000 * _stall(r, m) for r in lora_rows] for m in ("async_ckpt", "async_ckpt_incremental", "dcp_async_reused")}},
                     "ms")

    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512,2048", help="state sizes in MiB (model + AdamW), comma separated; 4096 for the big run")
    parser.add_argument("--params", type=float, default=None, help="instead of --sizes: a model of this many parameters, e.g. 1e9")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the state lives (cuda: pinned device-to-host)")
    parser.add_argument("--repeat", type=int, default=5, help="steady saves per method, after the first")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS + CUDA_METHODS + list(IO_METHODS))}")
    parser.add_argument("--lora", type=float, default=0.9, help="frozen share for the LoRA-style table (0 to skip it)")
    parser.add_argument("--lora-sizes", default="512,2048", help="state sizes in MiB for the LoRA-style table")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--name", default="stall", help="file stem of the results")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--quiet-below", type=float, default=0.0, help="shared machine: before each round wait (up to 10 min) until CPU pressure (PSI avg10, %%) is below this")
    parser.add_argument("--sequential", action="store_true", help="one method after another instead of interleaved rounds (less memory; automatic above --interleave-max-mib)")
    parser.add_argument("--interleave-max-mib", type=float, default=2100, help="largest state run interleaved (every method's buffers alive at once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype = DTYPES[args.dtype]
    sizes = [params_to_bytes(args.params, dtype) / MiB] if args.params else [float(s) for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if args.device.startswith("cuda"):
        methods += [m for m in CUDA_METHODS if m not in methods]
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows, lora_rows = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in sizes:
            interleave = not args.sequential and size <= args.interleave_max_mib
            rows.append(run(size, args.repeat, Path(tmp), dtype, args.device, methods, interleave, quiet=args.quiet_below))
        if args.lora > 0 and not args.params:
            for size in (float(s) for s in args.lora_sizes.split(",") if s):
                interleave = not args.sequential and size <= args.interleave_max_mib
                lora_rows.append(run(size, args.repeat, Path(tmp), dtype, args.device, LORA_METHODS, interleave, frozen=args.lora, quiet=args.quiet_below))
                print(lora_table(lora_rows[-1:]).splitlines()[-1], flush=True)
        info = machine(Path(tmp))
    text = table(rows) + ("\n\n" + lora_table(lora_rows) if lora_rows else "")
    print(text)
    settings = {"sizes_mib": sizes, "params": args.params, "dtype": args.dtype, "device": args.device, "repeat": args.repeat, "lora": args.lora}
    write_results(args.out, args.name, {"machine": info, "settings": settings, "rows": rows, "lora_rows": lora_rows}, text, plot(rows, lora_rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
