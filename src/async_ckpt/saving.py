"""The background half of a save: write this rank's files, report, commit on rank 0.

``run_job`` runs on the manager's single commit thread, one save at a time, and fans the file
writes out to the I/O thread pool. It never runs a collective (invariant 5); it talks to other
ranks only through the ``CommitChannel``. It always resolves the job's handle, whatever fails.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import faults, rundir
from .store_channel import CommitChannel, Outcome, Report, first_failure
from .components import FileFormat, StateComponent
from .errors import CheckpointSaveError, CheckpointSpaceError, CheckpointTimeoutError, describe
from .handle import SaveHandle
from .manifest import FileEntry, build_manifest, write_manifest
from .retention import apply_retention
from .serialization import write_safetensors, write_torch
from .sharded_io import write_shard
from .staging import BackgroundSnapshot
from .storage import FileSink, WrittenFile, write_file

logger = logging.getLogger(__name__)


@dataclass
class FileTask:
    """One file this rank writes: a component's staged state and where it goes."""

    component: StateComponent
    name: str
    slot: str
    state: Any
    chunks: list[dict[str, Any]] | None = None  # SHARDED: chunk records known before writing


@dataclass
class SaveJob:
    """Everything the commit thread needs for one save, built by ``save()`` on the training thread."""

    seq: int
    step: int
    handle: SaveHandle
    staging: Path
    final: Path
    tasks: list[FileTask]
    failure: Report | None = None  # a failure already met on the training thread
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SaveContext:
    """The manager's fixed settings that every job reads."""

    rank: int
    world_size: int
    output_dir: Path
    channel: CommitChannel
    io_pool: concurrent.futures.Executor
    codec: str | None
    level: int
    timeout_s: float
    save_total_limit: int | None
    components: list[dict[str, Any]]  # key, sharing_pattern, required, file_format, group, metadata
    protected: frozenset[int] = frozenset()  # steps retention must not delete (CheckpointManager.protect)
    metadata: dict[str, Any] = field(default_factory=dict)  # the manifest's metadata (mesh record, user keys)
    last_size: int = 0  # bytes of the newest committed checkpoint (commit thread: free-space check)


def outcome_margin(timeout_s: float) -> float:
    """Extra time ranks other than 0 wait, so rank 0's own timeout verdict reaches them first."""
    return max(5.0, 0.1 * timeout_s)


def run_job(ctx: SaveContext, job: SaveJob) -> None:
    """Persist, report and commit one save; resolve ``job.handle``. Commit thread only.

    Blocks on disk I/O, on the I/O pool, and on the Store for at most ``timeout_s`` (rank 0
    waiting for reports) or ``timeout_s + margin`` (other ranks waiting for the outcome). The
    handle is resolved whatever happens, so no ``wait()`` can hang on a dead job.
    """
    try:
        _run(ctx, job)
    except BaseException as exc:  # a bug or an interpreter shutdown: still end the save
        if not job.handle.done():
            job.handle._fail(CheckpointSaveError(describe(f"internal error: {type(exc).__name__}: {exc}", rank=ctx.rank, step=job.step, phase="commit", path=job.staging)))
        logger.exception("[rank %d step %d] save job crashed", ctx.rank, job.step)


def _run(ctx: SaveContext, job: SaveJob) -> None:
    started = time.monotonic()
    try:
        report = job.failure or _write_all(ctx, job)
    except CheckpointSpaceError as exc:  # refused before anything was written
        report = Report(rank=ctx.rank, ok=False, error=str(exc), kind="space")
    except Exception as exc:  # e.g. the staging directory cannot be created
        report = Report(rank=ctx.rank, ok=False, error=describe(f"{type(exc).__name__}: {exc}", rank=ctx.rank, step=job.step, phase="write", path=job.staging))
    job.handle._release()
    report.timings = {**job.timings, **report.timings, "persist_s": time.monotonic() - started}
    try:
        faults.hit("before_report", ctx.rank)
        ctx.channel.report(job.seq, report)
        if ctx.rank == 0:
            outcome = _commit(ctx, job)
        else:
            outcome = ctx.channel.outcome(job.seq, ctx.timeout_s + outcome_margin(ctx.timeout_s))
    except CheckpointTimeoutError as exc:
        outcome = Outcome(ok=False, kind="timeout", error=describe(str(exc), rank=ctx.rank, step=job.step, phase="commit", path=job.staging))
    except Exception as exc:  # the store itself failed: this rank cannot learn the outcome
        outcome = Outcome(ok=False, error=describe(f"coordination failed: {type(exc).__name__}: {exc}", rank=ctx.rank, step=job.step, phase="commit"))
    job.handle.timings.update(report.timings)
    if not outcome.ok:
        logger.error("[rank %d step %d] save failed: %s", ctx.rank, job.step, outcome.error)
        job.handle._fail(outcome.exception())
        return
    ctx.last_size = outcome.size_bytes or ctx.last_size
    job.handle._finish(Path(outcome.path))
    if ctx.rank == 0:
        _retain(ctx, job)


def _write_all(ctx: SaveContext, job: SaveJob) -> Report:
    rundir.check_space(ctx.output_dir, ctx.last_size, ctx.rank, job.step)
    rundir.stage(job.staging, ctx.rank)
    futures = {ctx.io_pool.submit(_write_one, ctx, job.staging, task): task for task in job.tasks}
    files: dict[str, dict[str, Any]] = {}
    error = ""
    for future in concurrent.futures.as_completed(futures):
        task = futures[future]
        try:
            written, extra = future.result()
        except Exception as exc:
            if not error:
                error = describe(f"{type(exc).__name__}: {exc}", rank=ctx.rank, step=job.step, component=task.component.key, phase="write", path=job.staging / task.name)
            continue
        entry = FileEntry(size=written.size, xxh3=written.xxh3, codec=written.codec, rank=ctx.rank, component=task.component.key, slot=task.slot, **extra)
        files[written.name] = dict(vars(entry))
    if error:
        return Report(rank=ctx.rank, ok=False, error=error)
    nbytes = sum(f["size"] for f in files.values())
    logger.debug("[rank %d step %d] wrote %d files, %d bytes", ctx.rank, job.step, len(files), nbytes)
    return Report(rank=ctx.rank, ok=True, files=files)


def _write_one(ctx: SaveContext, directory: Path, task: FileTask) -> tuple[WrittenFile, dict[str, Any]]:
    """I/O thread: serialize one component straight from its staged buffers into a file."""
    if task.chunks is not None:  # SHARDED: chunk records with byte ranges and hashes
        safetensors = task.component.file_format is FileFormat.SAFETENSORS
        written, chunks, pickle = write_shard(directory, task.name, task.state, task.chunks, safetensors=safetensors, produce_hook=lambda: faults.hit("mid_write", ctx.rank))
        faults.hit("before_rename", ctx.rank)
        return written, {"chunks": chunks, "pickle": pickle}

    def produce(sink: FileSink) -> None:
        if task.component.file_format is FileFormat.SAFETENSORS:
            write_safetensors(_FaultSink(sink, ctx.rank), task.state, component=task.component.key)
        else:
            write_torch(_FaultSink(sink, ctx.rank), task.state, component=task.component.key)
        faults.hit("before_fsync", ctx.rank)

    written = write_file(directory, task.name, produce, codec=ctx.codec, level=ctx.level)
    faults.hit("before_rename", ctx.rank)  # the file is durable; the directory rename is what commits
    return written, {}


class _FaultSink:
    """Passes writes through, firing the ``mid_write`` fault point after the first one."""

    def __init__(self, sink: FileSink, rank: int) -> None:
        self._sink, self._rank, self._first = sink, rank, True

    def write(self, data: Any) -> int:
        written = self._sink.write(data)
        if self._first:
            self._first = False
            faults.hit("mid_write", self._rank)
        return written

    def flush(self) -> None:
        self._sink.flush()


def _commit(ctx: SaveContext, job: SaveJob) -> Outcome:
    """Rank 0: wait for every report, then write the manifest and publish, or publish the failure."""
    waited = time.monotonic()
    try:
        reports = ctx.channel.collect(job.seq, ctx.timeout_s)
    except CheckpointTimeoutError as exc:
        outcome = Outcome(ok=False, kind="timeout", error=describe(str(exc), rank=0, step=job.step, phase="commit", path=job.staging))
    else:
        failed = first_failure(reports)
        if failed is not None:
            outcome = Outcome(ok=False, kind=failed.kind, error=failed.error)
        else:
            outcome = _publish(ctx, job, reports, time.monotonic() - waited)
    if not outcome.ok:
        rundir.discard(job.staging)
    ctx.channel.publish(job.seq, outcome)
    return outcome


def _publish(ctx: SaveContext, job: SaveJob, reports: list[Report], waited_s: float) -> Outcome:
    try:
        faults.hit("before_manifest", 0)
        files = {name: FileEntry(**entry) for r in reports for name, entry in r.files.items()}
        timings = {str(r.rank): r.timings for r in reports}
        timings["0"]["commit_wait_s"] = waited_s
        manifest = build_manifest(step=job.step, world_size=ctx.world_size, path=job.final, components=ctx.components, files=files, timings=timings, metadata=ctx.metadata)
        write_manifest(job.staging, manifest)
        rundir.publish(job.staging, job.final)
    except Exception as exc:
        return Outcome(ok=False, error=describe(f"commit failed: {type(exc).__name__}: {exc}", rank=0, step=job.step, phase="commit", path=job.staging))
    total = sum(f.size for f in files.values())
    logger.info(
        "[rank 0 step %d] committed %s: %d files, %d bytes, stall %.1f ms, persist %.2f s",
        job.step, job.final, len(files), total, 1000 * job.timings.get("stall_s", 0.0), reports[0].timings.get("persist_s", 0.0),
    )
    return Outcome(ok=True, path=str(job.final), size_bytes=total)


def _retain(ctx: SaveContext, job: SaveJob) -> None:
    if ctx.save_total_limit is None:
        return
    try:
        faults.hit("before_retention", 0)
        apply_retention(ctx.output_dir, ctx.save_total_limit, ctx.protected)
    except Exception as exc:  # retention failing never fails the save that committed
        logger.error("[rank 0 step %d] retention failed: %s: %s", job.step, type(exc).__name__, exc)


def run_after_snapshot(ctx: SaveContext, job: SaveJob, background: BackgroundSnapshot) -> None:
    """Commit thread, overlap mode: write only once the training thread confirmed the snapshot."""
    error = background.verdict(ctx.timeout_s)
    if error is not None and job.failure is None:
        job.failure = Report(rank=ctx.rank, ok=False, error=describe(error, rank=ctx.rank, step=job.step, phase="snapshot"))
    run_job(ctx, job)
