"""Shared pieces of the benchmarks: synthetic training state, timers, machine description, output."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20


class TensorDict:
    """A Stateful over a dict of tensors (a model's or an optimizer's flat state)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.tensors[name].copy_(value)


def synthetic_state(total_bytes: int, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights plus AdamW-style state (exp_avg, exp_avg_sq): 1/3 model, 2/3 optimizer.

    Tensors are 4 MiB-ish matrices like the layers of a transformer, filled with random data.
    """
    per_copy = total_bytes // 3
    elem = torch.finfo(dtype).bits // 8
    rows, cols = 1024, 1024
    count = max(1, per_copy // (rows * cols * elem))
    model = {f"layers.{i}.weight": torch.randn(rows, cols).to(dtype) for i in range(count)}
    optim = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(rows, cols).to(dtype), "exp_avg_sq": torch.rand(rows, cols).to(dtype)} for i in range(count)},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(count))}]}
    return model, optim


def tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
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


def drop_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write_results(out_dir: Path, name: str, results: dict[str, Any], table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{name}.md").write_text(table + "\n")
