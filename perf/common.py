"""Shared pieces of the benchmarks: synthetic training state, timers, machine description, output.

Every benchmark writes ``<out>/<name>.json`` (machine, settings, raw rows), ``<out>/<name>.md``
(the table) and ``<out>/<name>.png`` (the plot) under ``perf/results`` unless ``--out`` says
otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TensorDict:
    """A Stateful over a dict of tensors (a model's or an optimizer's flat state)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return self.tensors

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _copy_into(self.tensors, state)


class SyntheticModel(torch.nn.Module):
    """Parameters ``layers.<i>`` of shape (rows, cols), some of them frozen (LoRA-style base weights)."""

    def __init__(self, tensors: list[torch.Tensor], frozen: int = 0) -> None:
        super().__init__()
        self.layers = torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=i >= frozen) for i, t in enumerate(tensors))


def _copy_into(target: Any, source: Any) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for key, value in target.items():
            _copy_into(value, source[key])


def synthetic_state(total_bytes: int, dtype: torch.dtype = torch.float32, frozen_fraction: float = 0.0, cols: int = 1024) -> tuple[SyntheticModel, dict[str, Any]]:
    """A model and its AdamW state (exp_avg, exp_avg_sq, step) of about ``total_bytes`` together.

    Tensors are (1024, ``cols``) matrices like the layers of a transformer, random data. With
    ``frozen_fraction`` f, that share of the model's layers is frozen and has no optimizer state
    (LoRA-style fine-tuning), so the model is 1 / (1 + 2(1-f)) of the bytes.
    """
    elem = torch.finfo(dtype).bits // 8
    per_tensor = 1024 * cols * elem
    share = 1.0 / (1.0 + 2.0 * (1.0 - frozen_fraction))
    count = max(1, round(total_bytes * share / per_tensor))
    frozen = round(count * frozen_fraction)
    model = SyntheticModel([torch.randn(1024, cols).to(dtype) for _ in range(count)], frozen=frozen)
    optim = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(1024, cols).to(dtype), "exp_avg_sq": torch.rand(1024, cols).to(dtype)} for i in range(frozen, count)},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "params": list(range(frozen, count))}]}
    return model, optim


def params_to_bytes(params: float, dtype: torch.dtype) -> int:
    """State bytes of a model of ``params`` parameters in ``dtype`` plus AdamW's two moments (same dtype)."""
    return int(3 * params * (torch.finfo(dtype).bits // 8))


def tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, torch.nn.Module):
        return [p.detach() for p in state.state_dict().values()]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def nbytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop a file's (clean) pages from the page cache, so the next read comes from the disk."""
    paths = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_pressure() -> str:
    """The kernel's CPU pressure line (how often runnable tasks waited), or the load average."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "loadavg %.2f %.2f %.2f" % os.getloadavg()


def cpu_pressure_avg10() -> float | None:
    """Share of the last 10 s in which runnable tasks waited for a CPU (Linux PSI), in percent."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_quiet(below: float, max_wait_s: float = 600.0) -> float | None:
    """On a shared machine: wait (at most ``max_wait_s``) until CPU pressure drops below ``below``%.

    Returns the pressure when it returned. ``below <= 0`` does not wait.
    """
    deadline = time.monotonic() + max_wait_s
    pressure = cpu_pressure_avg10()
    while below > 0 and pressure is not None and pressure >= below and time.monotonic() < deadline:
        time.sleep(2.0)
        pressure = cpu_pressure_avg10()
    return pressure


def _disk(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path)}
    try:
        out = subprocess.run(["findmnt", "-n", "-T", str(path), "-o", "SOURCE,FSTYPE"], capture_output=True, text=True, timeout=5).stdout.split()
        info.update(device=out[0], fstype=out[1])
        dev = Path(out[0]).name.rstrip("0123456789") if out[0].startswith("/dev/") else None
        if dev and Path(f"/sys/block/{dev}/queue/rotational").exists():
            info["rotational"] = Path(f"/sys/block/{dev}/queue/rotational").read_text().strip() == "1"
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    usage = shutil.disk_usage(path)
    info["free_gib"] = round(usage.free / 2**30, 1)
    return info


def machine(disk_path: Path | None = None) -> dict[str, Any]:
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    thp = ""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "transparent_hugepage": thp,
        "disk": _disk(disk_path or Path(os.environ.get("TMPDIR", "/tmp"))),
        "cpu_pressure_at_end": cpu_pressure(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One markdown line: what the numbers were measured on."""
    disk = info.get("disk", {})
    return (
        f"Machine: {info['cpus']} cores ({info.get('cpu_model') or 'cpu'}), {info['memory_gib']} GiB RAM, torch {info['torch']} "
        f"({info['torch_threads']} intra-op threads), {'CUDA ' + info['cuda'] if info.get('cuda') else 'no GPU'}, "
        f"disk {disk.get('device', '?')} {disk.get('fstype', '')}{' (rotational)' if disk.get('rotational') else ''}; "
        f"load average at the end {info.get('loadavg_at_end')}, {info['date']}."
    )


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def write_results(out_dir: Path, name: str, results: dict[str, Any], table: str, plot: Any = None) -> None:
    """Write ``name``.json, ``name``.md (table and machine line) and, with ``plot(path)``, ``name``.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results.setdefault("machine", machine())
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(table + "\n\n" + describe_machine(results["machine"]) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json, .md{', .png' if plot else ''}", flush=True)


def bar_plot(path: Path, title: str, groups: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool = False, hline: float | None = None) -> None:
    """Grouped bars: one group per x label, one bar per series (None: no bar)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.45 * len(groups) * len(series)), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
        if pairs:
            ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, label=label)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_and_report(args: Any, name: str, run: Any, table: Any, plot: Any = None) -> dict[str, Any]:
    """The common tail of a benchmark's ``main``: run in a temporary folder (under ``--dir``),
    print the table, write JSON, markdown and the plot (``plot(result)`` returns the drawer)."""
    import logging
    import tempfile

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = run(args, Path(tmp))
        info = machine(Path(tmp))
    text = table(result)
    print(text)
    write_results(args.out, name, {"machine": info, **result}, text, plot(result) if plot is not None else None)
    return result
