"""Step time while a checkpoint persists in the background, through the real ``Trainer``.

``python -m perf.overlap [--steps 300] [--save-steps 25]``: a small transformer language model
(embedding, 2 ``nn.TransformerEncoder`` layers of width 256, output head; ~8 MiB of weights,
~25 MiB per checkpoint with AdamW state) trained with ``torch.set_num_threads(1)`` these ways:

* ``none``: no saves: the baseline step time;
* ``async``: ``async_save=True``, a save every ``save_steps``, one run per ``--io-threads``
  value (default 4 and 1): steps are split into those with no save in flight and those during
  which a save was being written (``Trainer.step_stats``); the stall is how long ``save()`` held
  the training thread (``Trainer.save_stalls``);
* ``sync``: ``async_save=False``: ``save()`` returns once the checkpoint committed.

Step time is the time of ``training_step`` (forward, backward, optimizer step), so the
comparison "save in flight vs none in flight" inside the async run is on the same process,
model and data. Prints a markdown table; writes perf/results/overlap.json and overlap.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from async_ckpt.trainer import Trainer, TrainingArguments
from perf.common import machine, write_results

VOCAB, SEQ, WIDTH = 1000, 64, 256


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.encoder(self.embed(input_ids)))
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


class TimedTrainer(Trainer):
    """Also records the training thread's CPU time per step: it does not count waiting for a core."""

    def training_step(self, batch: Any) -> torch.Tensor:
        started = time.thread_time()
        loss = super().training_step(batch)
        self.cpu_times.append(time.thread_time() - started)
        return loss


def paired_ratios(stats: list[tuple[int, float, bool]]) -> list[float]:
    """Each in-flight step over the median of the (up to 5) quiet steps just before it.

    Neighbouring steps share the machine's load at that moment, so on a shared, busy machine this
    isolates the cost of the save better than comparing medians over the whole run.
    """
    out = []
    for i, (_, seconds, busy) in enumerate(stats):
        quiet = [s for _, s, b in stats[max(0, i - 8) : i] if not b][-5:]
        if busy and len(quiet) >= 3:
            out.append(seconds / statistics.median(quiet))
    return out


def run(mode: str, root: Path, steps: int, save_steps: int, io_nice: int = 0, io_threads: int = 4) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyLM()
    args = TrainingArguments(
        output_dir=str(root / mode), max_steps=steps, per_device_train_batch_size=8, logging_steps=0,
        save_strategy="no" if mode == "none" else "steps", save_steps=save_steps, save_total_limit=2,
        async_save=mode != "sync", resume_from_checkpoint=False, save_io_nice=io_nice if mode == "async" else 0, save_io_threads=io_threads,
    )
    trainer = TimedTrainer(model=model, args=args, train_dataset=Tokens(8 * steps))
    trainer.cpu_times = []
    trainer.train()
    warm = [s for s in trainer.step_stats if s[0] > 5]  # skip allocator and first-save warm-up
    quiet = [sec for _, sec, busy in warm if not busy]
    busy = [sec for _, sec, busy in warm if busy]
    cpu = list(zip(trainer.cpu_times, (b for _, _, b in trainer.step_stats)))[5:]
    ratios = paired_ratios(warm)
    stalls = [sec for step, sec in trainer.save_stalls if step != save_steps and step != steps]
    return {
        "mode": mode if mode != "async" else f"async, {io_threads} io thread{'s' if io_threads > 1 else ''}",
        "io_threads": io_threads,
        "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "checkpoint_mib": _size(root / mode) / 2**20 / max(1, len(list((root / mode).glob("checkpoint-*")))),
        "steps_quiet": len(quiet), "steps_in_flight": len(busy),
        "quiet_median_ms": _ms(statistics.median(quiet)) if quiet else None,
        "quiet_p99_ms": _ms(_p99(quiet)) if quiet else None,
        "in_flight_median_ms": _ms(statistics.median(busy)) if busy else None,
        "in_flight_p99_ms": _ms(_p99(busy)) if busy else None,
        "paired_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "paired_ratio_p90": round(sorted(ratios)[int(0.9 * (len(ratios) - 1))], 3) if ratios else None,
        "quiet_cpu_median_ms": _ms(statistics.median([c for c, b in cpu if not b])),
        "in_flight_cpu_median_ms": _ms(statistics.median([c for c, b in cpu if b])) if any(b for _, b in cpu) else None,
        "save_stall_median_ms": _ms(statistics.median(stalls)) if stalls else None,
        "save_stall_max_ms": _ms(max(stalls)) if stalls else None,
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def table(rows: list[dict[str, Any]], base_median: float) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [
        "| mode | steps quiet / in flight | quiet median ms (p99) | in-flight median ms (p99) | in-flight vs quiet steps, same run | in-flight vs preceding quiet steps, median (p90) | in-flight vs no-save run | training-thread CPU ms quiet / in flight | save() stall ms median (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{100 * (r['in_flight_median_ms'] / base_median - 1):+.1f}%" if r["in_flight_median_ms"] else "-"
        same = f"{100 * (r['in_flight_median_ms'] / r['quiet_median_ms'] - 1):+.1f}%" if r["in_flight_median_ms"] else "-"
        paired = f"{100 * (r['paired_ratio_median'] - 1):+.1f}% ({100 * (r['paired_ratio_p90'] - 1):+.1f}%)" if r["paired_ratio_median"] else "-"
        lines.append(
            f"| {r['mode']} | {r['steps_quiet']} / {r['steps_in_flight']} | {cell(r['quiet_median_ms'])} ({cell(r['quiet_p99_ms'])}) | "
            f"{cell(r['in_flight_median_ms'])} ({cell(r['in_flight_p99_ms'])}) | {same} | {paired} | {ratio} | "
            f"{cell(r['quiet_cpu_median_ms'])} / {cell(r['in_flight_cpu_median_ms'])} | {cell(r['save_stall_median_ms'])} ({cell(r['save_stall_max_ms'])}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--io-nice", type=int, default=0, help="save_io_nice for the async run (0-19)")
    parser.add_argument("--io-threads", default="4,1", help="save_io_threads of the async runs, one row each (comma separated)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    threads = [int(n) for n in options.io_threads.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="overlap_") as tmp:
        rows = [run("none", Path(tmp) / "none", options.steps, options.save_steps)]
        rows += [run("async", Path(tmp) / f"async{n}", options.steps, options.save_steps, options.io_nice, n) for n in threads]
        rows.append(run("sync", Path(tmp) / "sync", options.steps, options.save_steps))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {"machine": machine(), "load_average": load, "steps": options.steps, "save_steps": options.save_steps, "io_nice": options.io_nice, "rows": rows}
    text = report(results)
    print(text)
    write_results(options.out, "overlap", results, text)


def report(results: dict[str, Any]) -> str:
    """The markdown table and its notes, from a run's results (``perf/results/overlap.json``)."""
    rows = results["rows"]
    return table(rows, rows[0]["quiet_median_ms"]) + (
        f"\n\nModel {rows[0]['model_mib']:.1f} MiB, checkpoint {rows[1]['checkpoint_mib']:.1f} MiB; "
        f"{results['steps']} steps, a save every {results['save_steps']}; save_io_nice {results.get('io_nice', 0)}; torch threads 1; "
        f"{results['machine'].get('cpus', os.cpu_count())} CPUs, load average {results['load_average']:.1f} at the end. 'Same run' compares the "
        "in-flight median with the median of the steps of that run with no save in flight; 'preceding quiet steps' divides each "
        "in-flight step by the median of the quiet steps just before it (both robust to a machine whose speed drifts between runs); "
        "'vs no-save run' compares with the median step of the run without saves, minutes earlier (not robust to that drift)."
    )

if __name__ == "__main__":
    main()
