"""Commit cost against world size: from the last rank's report to the published checkpoint.

``python -m perf.commit_cost --ranks 2,4,8,16,32,64 --repeat 5``

N simulated ranks are threads of one process. Each has its own ``TCPStore`` client on one
server (as a job's ranks share the default store), its own ``CommitChannel`` and
``SaveContext``, and runs the real ``saving.run_job``: write one small PER_RANK file, report;
rank 0 collects every report, writes the manifest, renames the staging directory, publishes the
outcome; every other rank polls for it. A channel subclass stamps the instants:

- ``last report``: the latest instant any rank's ``report()`` returned;
- ``collected``: rank 0's ``collect()`` returned (every report read);
- ``published``: rank 0's outcome is in the store (manifest durable, directory renamed);
- ``all seen``: the last rank read the outcome;
- ``forgotten``: rank 0 has deleted the previous save's keys (after publishing, before its own
  handle resolves).

Columns: detect = collected - last report (rank 0 noticing the last report and reading all N),
commit = published - collected (manifest + fsync + rename), total = published - last report,
fan-out = all seen - published, clean-up = forgotten - published. Medians over ``--repeat`` saves. Threads share one GIL, so the
numbers are an upper bound for the Python side and a lower bound for network latency.

``--rank0 1000,10000`` also times rank 0's share alone at sizes threads cannot reach: while
rank 0 waits in ``collect``, one other client hands in N reports (``--files-per-rank`` files
each) as fast as it can, standing in for N ranks finishing together; rank 0 then writes the
manifest and publishes (``saving._publish``, the production code) and deletes the keys.
detect = collect returned - last report stored; total = published - last report stored.
``--rtt-us 100`` delays each of rank 0's store calls by that much, as a store on another host
would (loopback is ~20 us); the table counts rank 0's store calls.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from async_ckpt.store_channel import CommitChannel, Outcome, Report
from async_ckpt.components import SharingPattern, StateComponent
from async_ckpt.handle import SaveHandle
from async_ckpt.saving import FileTask, SaveContext, SaveJob, _publish, run_job
from perf.common import TensorDict, machine, median, write_results


class TimedChannel(CommitChannel):
    """A ``CommitChannel`` that stamps when each protocol step finishes (perf_counter)."""

    def __init__(self, store: Any, rank: int, world_size: int, stamps: dict) -> None:
        super().__init__(store, rank, world_size)
        self.stamps = stamps

    def report(self, seq: int, report: Report) -> None:
        super().report(seq, report)
        self.stamps.setdefault(seq, {}).setdefault("report", {})[self.rank] = time.perf_counter()

    def collect(self, seq: int, timeout_s: float) -> list[Report]:
        reports = super().collect(seq, timeout_s)
        self.stamps.setdefault(seq, {})["collected"] = time.perf_counter()
        return reports

    def _forget(self, seq: int) -> None:  # called by publish() right after the outcome is set
        self.stamps.setdefault(seq + 1, {})["published"] = time.perf_counter()
        super()._forget(seq)
        self.stamps[seq + 1]["forgotten"] = time.perf_counter()

    def outcome(self, seq: int, timeout_s: float) -> Outcome:
        outcome = super().outcome(seq, timeout_s)
        self.stamps.setdefault(seq, {}).setdefault("seen", {})[self.rank] = time.perf_counter()
        return outcome


def _contexts(world: int, port: int, out: Path, io_pool: concurrent.futures.Executor, stamps: dict) -> list[SaveContext]:
    component = StateComponent("optimizer", TensorDict({}), sharing_pattern=SharingPattern.PER_RANK)
    described = [{"key": "optimizer", "sharing_pattern": "per_rank", "required": False, "file_format": "torch", "group": None, "metadata": {}}]
    contexts = []
    for rank in range(world):
        client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60))
        store = dist.PrefixStore(f"n{world}/", client)
        contexts.append(SaveContext(
            rank=rank, world_size=world, output_dir=out, channel=TimedChannel(store, rank, world, stamps), io_pool=io_pool,
            codec=None, level=1, timeout_s=60.0, save_total_limit=2, components=described,
        ))
    contexts[0].component = component  # type: ignore[attr-defined]
    return contexts


def _save(contexts: list[SaveContext], seq: int, out: Path) -> None:
    """One save on every simulated rank at once; raises if any rank's handle failed."""
    component = contexts[0].component  # type: ignore[attr-defined]
    final = out / f"checkpoint-{seq}"
    jobs = []
    for ctx in contexts:
        task = FileTask(component, f"optimizer_state_rank_{ctx.rank}.pt", f"rank:{ctx.rank}", {"w": torch.full((16,), float(ctx.rank))})
        jobs.append(SaveJob(seq=seq, step=seq, handle=SaveHandle(seq, final), staging=out / f".checkpoint-{seq}.staging-perf{seq}", final=final, tasks=[task]))
    threads = [threading.Thread(target=run_job, args=(ctx, job)) for ctx, job in zip(contexts, jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in jobs:
        job.handle.wait(0)


def store_round_trip_us(port: int, n: int = 2000) -> dict[str, float]:
    """Microseconds per store operation from one client: set, get, check of one key, add."""
    client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60))
    client.set("rtt/key", "x" * 200)
    out = {}
    for name, op in (("set", lambda: client.set("rtt/key", "x" * 200)), ("get", lambda: client.get("rtt/key")),
                     ("check", lambda: client.check(["rtt/key"])), ("add", lambda: client.add("rtt/count", 1))):
        started = time.perf_counter()
        for _ in range(n):
            op()
        out[name] = 1e6 * (time.perf_counter() - started) / n
    return out


def run(world: int, repeat: int, port: int, root: Path) -> dict[str, Any]:
    stamps: dict = {}
    out = root / f"n{world}"
    out.mkdir(parents=True)
    with concurrent.futures.ThreadPoolExecutor(8) as io_pool:
        contexts = _contexts(world, port, out, io_pool, stamps)
        for seq in range(repeat + 1):  # save 0 warms up
            _save(contexts, seq, out)
    rows = {"detect_s": [], "commit_s": [], "total_s": [], "fanout_s": [], "cleanup_s": []}
    for seq in range(1, repeat + 1):
        s = stamps[seq]
        last = max(s["report"].values())
        rows["detect_s"].append(s["collected"] - last)
        rows["commit_s"].append(s["published"] - s["collected"])
        rows["total_s"].append(s["published"] - last)
        rows["fanout_s"].append(max(s["seen"].values()) - s["published"] if world > 1 else 0.0)
        rows["cleanup_s"].append(s["forgotten"] - s["published"])
    return {"world": world, **{k: median(v) for k, v in rows.items()}}


class RemoteStore:
    """Rank 0's view of a store on another host: every call waits ``rtt_s`` first, and is counted."""

    def __init__(self, store: Any, rtt_s: float) -> None:
        self._store, self._rtt_s, self.calls = store, rtt_s, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def call(*args: Any) -> Any:
            self.calls += 1
            if self._rtt_s:
                deadline = time.perf_counter() + self._rtt_s
                while time.perf_counter() < deadline:  # sleep() is too coarse for 100 us
                    pass
            return method(*args)

        return call


def rank0_cost(world: int, files_per_rank: int, port: int, root: Path, rtt_s: float = 0.0) -> dict[str, Any]:
    """Rank 0's work for one save of ``world`` ranks that all report at once (see the module doc)."""
    prefix = f"rank0-n{world}/"
    store = RemoteStore(dist.PrefixStore(prefix, dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=120))), rtt_s)
    others = dist.PrefixStore(prefix, dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=120)))
    described = [{"key": f"c{i}", "sharing_pattern": "per_rank", "required": False, "file_format": "torch", "group": None, "metadata": {}} for i in range(files_per_rank)]
    reports = []
    for rank in range(world):
        files = {f"c{i}_state_rank_{rank}.pt": {"size": 123456, "xxh3": "0123456789abcdef", "codec": None, "rank": rank, "component": f"c{i}", "slot": f"rank:{rank}"}
                 for i in range(files_per_rank)}
        reports.append(Report(rank=rank, ok=True, files=files, timings={"stall_s": 0.01, "snapshot_s": 0.01, "persist_s": 0.5}))
    last: dict[str, float] = {}

    def hand_in() -> None:
        time.sleep(0.05)  # rank 0 is waiting by then
        for rank, report in enumerate(reports):
            CommitChannel(others, rank, world).report(0, report)
        last["report"] = time.perf_counter()

    channel = CommitChannel(store, 0, world)
    out = root / f"rank0-n{world}"
    staging, final = out / ".checkpoint-0.staging-perf", out / "checkpoint-0"
    staging.mkdir(parents=True)
    ctx = SaveContext(rank=0, world_size=world, output_dir=out, channel=channel, io_pool=None, codec=None, level=1,  # type: ignore[arg-type]
                      timeout_s=60.0, save_total_limit=None, components=described)
    job = SaveJob(seq=0, step=0, handle=SaveHandle(0, final), staging=staging, final=final, tasks=[])
    filler = threading.Thread(target=hand_in)
    filler.start()
    reports = channel.collect(0, 120.0)
    collected = time.perf_counter()
    calls = store.calls
    filler.join()
    started = last["report"]
    outcome = _publish(ctx, job, reports, collected - started)
    assert outcome.ok, outcome.error
    channel.publish(0, outcome)
    published = time.perf_counter()
    channel._forget(0)
    forgotten = time.perf_counter()
    return {"world": world, "files": world * files_per_rank, "detect_s": collected - started, "manifest_publish_s": published - collected,
            "total_s": published - started, "cleanup_s": forgotten - published, "manifest_bytes": (final / "checkpoint_manifest.json").stat().st_size,
            "collect_store_calls": calls, "rtt_us": 1e6 * rtt_s}


def rank0_table(rows: list[dict[str, Any]]) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = ["| ranks | added RTT (us) | rank 0 store calls in collect | detect: last report -> all read (ms) | manifest + publish (ms) | total: last report -> published (ms) | key clean-up (ms) | manifest size |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['rtt_us']:.0f} | {r['collect_store_calls']} | {ms(r['detect_s'])} | {ms(r['manifest_publish_s'])} | {ms(r['total_s'])} | {ms(r['cleanup_s'])} | {r['manifest_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def fit(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least squares ``a + b * world`` over the rows."""
    xs, ys = [r["world"] for r in rows], [r[key] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    if len(set(xs)) < 2:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def table(rows: list[dict[str, Any]], rtt: dict[str, float]) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = ["| ranks | detect (ms) | manifest + publish (ms) | total: last report -> published (ms) | fan-out to all ranks (ms) | rank 0 key clean-up (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {ms(r['detect_s'])} | {ms(r['commit_s'])} | {ms(r['total_s'])} | {ms(r['fanout_s'])} | {ms(r['cleanup_s'])} |")
    a, b = fit(rows, "total_s")
    lines.append("")
    lines.append(f"Linear fit of total: {1000 * a:.1f} ms + {1e6 * b:.0f} us x ranks -> {a + b * 10_000:.2f} s at 10,000 ranks.")
    lines.append("Store round trip from one client (us): " + ", ".join(f"{k} {v:.0f}" for k, v in rtt.items()))
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], rank0_rows: list[dict[str, Any]]) -> None:
    """Time from the last report to the published checkpoint against world size (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["world"] for r in rows], [1000 * r["total_s"] for r in rows], "o-", label="threads: last report -> published")
    ax.plot([r["world"] for r in rows], [1000 * r["fanout_s"] for r in rows], "s--", label="threads: published -> all ranks know")
    for rtt in sorted({r["rtt_us"] for r in rank0_rows}):
        mine = [r for r in rank0_rows if r["rtt_us"] == rtt]
        ax.plot([r["world"] for r in mine], [1000 * r["total_s"] for r in mine], "^-", label=f"rank 0 alone (+{rtt:.0f} us RTT): last report -> published")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("ms")
    ax.set_title("Commit cost against world size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4,8,16,32,64", help="simulated world sizes, comma separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--name", default="commit_cost", help="results file stem")
    parser.add_argument("--rank0", default="", help="world sizes for the rank-0-only measurement, e.g. 1000,10000")
    parser.add_argument("--files-per-rank", type=int, default=3, help="files each rank reports in the rank-0-only measurement")
    parser.add_argument("--rtt-us", default="0", help="round-trip times added to rank 0's store calls in the rank-0-only measurement, comma separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in [int(n) for n in args.ranks.split(",")]:
            rows.append(run(world, args.repeat, server.port, Path(tmp)))
            print(f"{world:>5} ranks: total {1000 * rows[-1]['total_s']:.1f} ms", flush=True)
        rank0_rows = [rank0_cost(int(n), args.files_per_rank, server.port, Path(tmp) / f"rtt{rtt}", float(rtt) * 1e-6)
                      for rtt in args.rtt_us.split(",") for n in args.rank0.split(",") if n]
    rtt = store_round_trip_us(server.port)
    text = table(rows, rtt)
    if rank0_rows:
        text += "\n\nRank 0 alone, N reports handed in back to back by one other client:\n\n" + rank0_table(rank0_rows)
    print(text)
    a, b = fit(rows, "total_s")
    write_results(args.out, args.name, {"machine": machine(), "repeat": args.repeat, "rows": rows, "rank0_rows": rank0_rows, "store_rtt_us": rtt,
                                        "fit_total_s": {"intercept": a, "per_rank": b, "at_10000": a + b * 10_000}}, text)
    try:
        plot(args.out / f"{args.name}.png", rows, rank0_rows)
    except ImportError:  # matplotlib is a dev extra
        pass


if __name__ == "__main__":
    main()
