"""``CheckpointManager``: save without stopping training, commit atomically, resume by itself.

Public methods are called on the training thread, by every rank of the job in the same order
(``save``, ``load`` and construction are collective over the manager's ranks). Background work
runs on one commit thread and ``num_io_threads`` I/O threads per rank (see ``saving``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import faults, rundir
from .store_channel import CommitChannel, Report
from .config import check_args, check_lock_timeout, check_incremental, default_io_threads, describe_component, lower_priority
from .coordination import Coordinator, coordination_group
from .components import FileFormat, SharingPattern, StateComponent, ValidationLevel, check_components
from .draining import InFlight, steps_text
from .errors import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointTimeoutError,
    describe,
)
from .handle import SaveHandle
from .layout import checkpoint_dirname, file_name, list_committed, slot, staging_dirname, writes
from .loading import LoadResult, load_checkpoint
from .ownership import Ownership, acquire
from .mesh import check_mesh_ranks, manifest_metadata, mesh_groups
from .dtensor_chunks import shard_state
from .saving import FileTask, SaveContext, SaveJob, outcome_margin, run_after_snapshot, run_job
from .staging import BackgroundSnapshot, StagingPool, frozen_identities
from .topology import Topology
from .validation import validate_replication

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and loads a list of ``StateComponent``s under ``output_dir``.

    Construction is collective: every rank of ``process_group`` (default: the whole job) builds
    its manager at the same point; rank 0 removes what crashed saves left behind.

    ``process_groups={name: group}`` and ``mesh=`` (a ``DeviceMesh`` with dimension names, each
    dimension becoming a group of that name; see ``mesh.py``) name the groups PER_GROUP
    components use. ``metadata`` (JSON) goes into every manifest, with the mesh under "mesh".

    ``incremental``: keys of ``nn.Module`` components whose frozen parameters
    (``requires_grad=False``, held by no optimizer among the components) are not copied again
    while unchanged by torch's version counter. Contract: such parameters are written only by
    in-place torch ops, never through ``.data``, NumPy, DLPack or raw storage;
    ``verify_incremental=True`` compares the skipped bytes and fails the save on a violation (a
    debug mode: it reads them all). See docs/performance.md.

    ``num_io_threads``: files written at once by this rank; default one less than the cores this
    process may run on, from 1 to 4, so a save in flight leaves a core to the training thread.

    ``io_nice`` (0-19): run the I/O and commit threads at a lower CPU priority, so that on a
    machine with few cores a save in flight takes less CPU from training (saves take longer).

    ``lock_timeout_s``: how long construction waits for another job that owns ``output_dir`` to
    end (a requeued job's predecessor still draining) before ``CheckpointLockError``; see
    ``ownership.py``. An ``output_dir`` that cannot be created or written raises
    ``CheckpointDirectoryError`` here, on every rank.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        components: Sequence[StateComponent],
        *,
        async_save: bool = True,
        process_group: Any = None,
        process_groups: Mapping[str, Any] | None = None,
        num_io_threads: int | None = None,
        compression: str | None = None,
        compression_level: int = 1,
        save_total_limit: int | None = None,
        verify_on_load: bool = True,
        timeout_s: float = 600.0,
        on_busy: str = "block",
        pin_memory: bool | None = None,
        mesh: Any = None,
        metadata: Mapping[str, Any] | None = None,
        incremental: Sequence[str] = (),
        verify_incremental: bool = False,
        io_nice: int = 0,
        lock_timeout_s: float = 60.0,
    ) -> None:
        num_io_threads = default_io_threads() if num_io_threads is None else num_io_threads
        check_args(num_io_threads, compression, compression_level, save_total_limit, timeout_s, on_busy)
        check_lock_timeout(lock_timeout_s)
        self.lock_timeout_s = float(lock_timeout_s)
        self._ownership: Ownership | None = None  # rank 0's hold on output_dir, released at close()
        self._last_size = 0  # bytes of the newest committed checkpoint at start (rank 0's view, broadcast)
        self.output_dir = Path(output_dir)
        self.components = list(components)
        self.async_save = async_save
        self.verify_on_load = verify_on_load
        self.timeout_s = float(timeout_s)
        self.on_busy = on_busy
        self.removed_leftovers: list[Path] = []  # what start-up cleanup removed (rank 0)
        process_groups = mesh_groups(mesh, process_groups) if mesh is not None else dict(process_groups or {})
        self.metadata = manifest_metadata(metadata, mesh)  # into every manifest; "mesh" checked on load
        check_components(self.components, list(process_groups))
        self._incremental = check_incremental(self.components, incremental)
        distributed = dist.is_available() and dist.is_initialized()
        world_ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD) if distributed else [0]
        self._peers = Coordinator(coordination_group(process_group, max(self.timeout_s, self.lock_timeout_s + 60.0)) if distributed else None, world_ranks)
        if mesh is not None:
            check_mesh_ranks(mesh, world_ranks)
        base = Topology.detect(process_group)
        places = self._peers.places(process_groups, base.rank) if process_groups else {}
        self.topology = Topology(base.rank, base.world_size, base.local_rank, base.node, places)
        self.run_id = self._start()
        store = dist.PrefixStore(f"async_ckpt/{self.run_id}/", dist.distributed_c10d._get_default_store()) if distributed else dist.HashStore()
        self._pool = StagingPool(pin_memory, verify_incremental=verify_incremental)
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-copy")  # overlap mode
        self._pending: tuple[BackgroundSnapshot, SaveJob] | None = None  # overlap save awaiting wait_snapshot()
        if not isinstance(io_nice, int) or not 0 <= io_nice <= 19:
            raise CheckpointConfigError(f"io_nice must be an integer from 0 (normal) to 19 (lowest CPU priority), got {io_nice!r}")
        nice: dict[str, Any] = {"initializer": lower_priority, "initargs": (io_nice,)} if io_nice else {}
        self._io = concurrent.futures.ThreadPoolExecutor(num_io_threads, thread_name_prefix="async_ckpt-io", **nice)
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-commit", **nice)
        self._ctx = SaveContext(
            rank=self.topology.rank,
            world_size=self.topology.world_size,
            output_dir=self.output_dir,
            channel=CommitChannel(store, self.topology.rank, self.topology.world_size),
            io_pool=self._io,
            codec=compression,
            level=compression_level,
            timeout_s=self.timeout_s,
            save_total_limit=save_total_limit,
            components=[describe_component(c) for c in self.components],
            metadata=self.metadata,
            last_size=self._last_size,
        )
        self._seq = 0
        self._last: SaveHandle | None = None
        self._saves = InFlight(self.topology.rank, (self._committer, self._io, self._copier), self._bounded_wait_s())

    # ----------------------------------------------------------------------------------- save

    def prepare(self) -> None:
        """Allocate the staging buffers now, so the first ``save()`` stalls no longer than later ones.

        Training thread. Reserves buffers for the state as it is now: call it after ``load()``,
        and after the first optimizer step when the optimizer creates its state lazily (AdamW
        does), or the first save still allocates the optimizer's buffers.
        """
        for component in self.components:
            if writes(component, self.topology):
                self._pool.reserve(component.key, component.stateful.state_dict())

    def save(self, step: int, *, overlap: bool = False) -> SaveHandle:
        """Snapshot every component and return while the checkpoint is written in the background.

        Training thread, every rank, same steps in the same order. Blocks while the previous save
        still holds the staging buffers (``on_busy="block"``) or returns a skipped handle on every
        rank (``"skip"``); then for the copy into the buffers; with ``async_save=False`` until
        the commit. Raises first the unobserved failure of an earlier save, if any; raises
        ``ReplicationValidationError`` on every rank when a REPLICATED component differs.

        ``overlap=True`` (async saves): return before the large tensors are copied; the copy runs
        on a helper thread while forward and backward compute, and ``wait_snapshot()`` must be
        called before the optimizer step or any other change to the state.
        """
        self._check_open()
        self.wait_snapshot()
        started = time.perf_counter()
        self._saves.raise_unobserved()
        step = int(step)
        final = self.output_dir / checkpoint_dirname(step)
        if self._busy_decision():
            logger.info("[rank %d step %d] previous save still in flight: skipping this one (on_busy='skip')", self.topology.rank, step)
            return SaveHandle(step, final, skipped=True)
        if self._last is not None and not self._last._released.wait(self._bounded_wait_s()):
            raise CheckpointTimeoutError(
                f"[rank {self.topology.rank} step {step}] the previous save (step {self._last.step}) still holds the "
                f"staging buffers after {self._bounded_wait_s():g}s; its writes are stuck (path: {self._last.path})"
            )
        seq, self._seq = self._seq, self._seq + 1
        handle = SaveHandle(step, final)
        validate_started = time.perf_counter()
        self._validate(step)
        copy_started = time.perf_counter()
        tasks, failure, background = self._snapshot(step, overlap and self.async_save)
        now = time.perf_counter()
        job = SaveJob(
            seq=seq, step=step, handle=handle, tasks=tasks, failure=failure, final=final,
            staging=self.output_dir / staging_dirname(step, f"{self.run_id}-{seq}"),
            timings={"stall_s": now - started, "validate_s": copy_started - validate_started, "snapshot_s": now - copy_started},
        )
        handle.timings.update(job.timings)
        self._last = handle
        self._saves.add(handle)
        if background is None:
            self._committer.submit(run_job, self._ctx, job)
        else:
            self._pending = (background, job)
            self._committer.submit(run_after_snapshot, self._ctx, job, background)
        logger.debug("[rank %d step %d] staged in %.1f ms", self.topology.rank, step, 1000 * (now - started))
        if not self.async_save:
            handle.wait()
        return handle

    def wait_snapshot(self) -> None:
        """Overlap mode: block until the last ``save(overlap=True)``'s copy is complete.

        Training thread, after backward and before the optimizer step (or any other in-place
        change to the state). A no-op when no overlap save is pending. If the state changed
        while it was being copied, that save fails (its handle raises); training goes on.
        """
        if self._pending is None:
            return
        (background, job), self._pending = self._pending, None
        job.timings["snapshot_wait_s"] = job.handle.timings["snapshot_wait_s"] = background.wait()

    def _snapshot(self, step: int, overlap: bool = False) -> tuple[list[FileTask], Report | None, BackgroundSnapshot | None]:
        """Copy this rank's share of every component into the staging buffers (overlap: start to)."""
        topo = self.topology
        tasks, plans = [], []
        component = None
        optimizers = [c.stateful for c in self.components if isinstance(c.stateful, torch.optim.Optimizer)]
        try:
            for component in self.components:
                if writes(component, topo):
                    frozen = frozen_identities(component.stateful, optimizers) if component.key in self._incremental else ()
                    state, chunks = component.stateful.state_dict(), None
                    if component.sharing_pattern is SharingPattern.SHARDED:  # local chunks only, never compressed
                        state, chunks = shard_state(state, topo.rank, safetensors=component.file_format is FileFormat.SAFETENSORS)
                    flat = component.file_format is FileFormat.SAFETENSORS
                    plan = self._pool.plan(component.key, state, frozen=frozen, flat=flat)
                    if not overlap:
                        plan.run()
                    plans.append(plan)
                    name = file_name(component, topo, self._ctx.codec is not None and chunks is None)
                    tasks.append(FileTask(component, name, slot(component, topo), plan.staged, chunks))
            faults.hit("after_snapshot", topo.rank)
            background = BackgroundSnapshot(plans, self._copier) if overlap else None  # last: nothing can fail after it starts
        except Exception as exc:
            key = component.key if component is not None else None
            return [], Report(rank=topo.rank, ok=False, error=describe(f"{type(exc).__name__}: {exc}", rank=topo.rank, step=step, component=key, phase="snapshot")), None
        return tasks, None, background

    def _validate(self, step: int) -> None:
        if self._peers.group is None or self.topology.world_size == 1:
            return
        for component in self.components:
            if component.validation is ValidationLevel.NONE:
                continue
            try:
                state = component.stateful.state_dict()
            except Exception as exc:  # still take part in the collective, so no rank hangs
                state = {"__state_dict_failed__": f"{type(exc).__name__}: {exc}"}
            validate_replication(component.key, state, component.validation, self._peers.group, rank=self.topology.rank, step=step)

    def _busy_decision(self) -> bool:
        """With ``on_busy="skip"``: whether any rank still holds the buffers (agreed by all)."""
        if self.on_busy != "skip" or self._last is None:
            return False
        return self._peers.any(not self._last._released.is_set())

    # ----------------------------------------------------------------------------------- wait

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until every save in flight has ended; return the last one's committed path.

        Training thread. Raises, once, the failure of any save nobody has seen fail yet.
        ``timeout``: seconds for all of them together (default: the bounded wait, for each save);
        ``CheckpointTimeoutError`` when one is still running then (it goes on).
        """
        self._check_open()
        self.wait_snapshot()
        deadline = None if timeout is None else time.monotonic() + timeout
        for handle in list(self._saves.handles):
            limit = self._bounded_wait_s() if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                handle._future.exception(limit)
            except concurrent.futures.TimeoutError:
                waited = self._bounded_wait_s() if timeout is None else timeout
                raise CheckpointTimeoutError(f"[rank {self.topology.rank} step {handle.step}] save still running after {waited:g}s (path: {handle.path})") from None
        limit = self._bounded_wait_s() if deadline is None else max(0.0, deadline - time.monotonic())
        try:  # the commit thread goes idle only after retention: wait() means everything is done
            self._committer.submit(lambda: None).result(limit)
        except concurrent.futures.TimeoutError:
            raise CheckpointTimeoutError(f"[rank {self.topology.rank}] retention still running after {limit:g}s") from None
        self._saves.raise_unobserved()
        last = self._last
        return None if last is None or last.skipped or last.failed() else last.wait(0)

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight saves and stop the background threads. Idempotent.

        Training thread. Logs the saves it waits for and how each ended. Waits at most ``timeout``
        seconds for all of them (default: the bounded wait, by when every save has ended by its
        own timeouts; ``0``: not at all); a save still running then is left to its threads, logged
        as not committed, and ``CheckpointTimeoutError`` is raised. Raises the failure of the last
        save if nobody has seen it yet. Interpreter exit drains a manager nobody closed (logged).
        """
        if self._saves.closed:
            return
        in_flight = self._saves.running()
        if in_flight:
            logger.info("[rank %d] closing: waiting for %d save(s) in flight: %s", self.topology.rank, len(in_flight), steps_text(in_flight))
        started = time.monotonic()
        try:
            self.wait(timeout)
        finally:
            running = self._saves.stop(in_flight, started)
            if self._ownership is not None and not running:  # a save still running keeps the directory
                self._ownership.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as error:  # do not hide the exception that is already unwinding
            logger.error("while closing after %s: %s", exc_type.__name__, error)

    @property
    def coordination_group(self) -> Any:
        """The gloo group over the manager's ranks that only training threads use; None in one process.

        A trainer may run its own small collectives on it from the training thread, in the same
        order on every rank (``trainer/control.py`` agrees there on when to stop).
        """
        return self._peers.group

    # ----------------------------------------------------------------------------------- load

    def protect(self, step: int, keep: bool = True) -> None:
        """Spare committed ``checkpoint-<step>`` from retention (e.g. the best one so far).

        Training thread; only rank 0's set matters. Protected checkpoints count toward
        ``save_total_limit``. ``keep=False`` lifts the protection.
        """
        steps = set(self._ctx.protected)
        steps.add(int(step)) if keep else steps.discard(int(step))
        self._ctx.protected = frozenset(steps)  # replaced, never mutated: the commit thread reads it

    def latest(self) -> Path | None:
        """The newest committed checkpoint directory (by step), without verifying it."""
        committed = list_committed(self.output_dir)
        return committed[-1][1] if committed else None

    def load(self, checkpoint: str | os.PathLike[str] | None = None, strict: bool = True) -> LoadResult | None:
        """Restore every component from a checkpoint; collective over the manager's ranks.

        ``checkpoint=None``: the newest committed checkpoint that verifies; damaged ones are
        skipped with the reason logged; returns None when there is none at all. A path: that
        checkpoint, or ``CheckpointNotFoundError`` / ``CheckpointCorruptError``. ``strict=False``
        skips optional components whose files are missing; required ones always load.
        """
        self._check_open()
        self.wait()
        return load_checkpoint(
            self.output_dir, self.components, self.topology, checkpoint=checkpoint, strict=strict,
            verify=self.verify_on_load, mesh=self.metadata.get("mesh"), gather=self._peers.gather, broadcast=self._peers.broadcast,
        )

    # ----------------------------------------------------------------------------------- internals

    def _start(self) -> str:
        """Rank 0 takes ``output_dir`` and recovers leftovers; every rank learns the run id, or the error.

        Collective (two small collectives when distributed). Rank 0 blocks up to
        ``lock_timeout_s`` for a live owner to go. Every rank then checks that it can write there.
        """
        run_id, error = uuid.uuid4().hex[:12], None
        if self.topology.is_rank0:
            try:
                self._ownership, self.removed_leftovers, self._last_size = self._take_directory()
            except CheckpointError as exc:
                error = exc
        run_id, error, self._last_size = self._peers.broadcast((run_id, error, self._last_size))
        if error is None and self._peers.group is not None:
            errors = self._peers.gather(None if self.topology.is_rank0 else rundir.check_writable(self.output_dir, self.topology.rank))
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            if self._ownership is not None:
                self._ownership.release()
            raise error
        return run_id

    def _take_directory(self) -> tuple[Ownership, list[Path], int]:
        """Rank 0: create ``output_dir``, own it, recover leftovers; report free space. Training thread."""
        rundir.make_run_dir(self.output_dir)
        ownership = acquire(self.output_dir, self.lock_timeout_s)
        try:
            removed = rundir.recover(self.output_dir)
            if removed:
                logger.warning("[rank 0] removed %d leftover(s) of interrupted saves or deletions: %s",
                               len(removed), ", ".join(p.name for p in removed))
            last_size = rundir.report_space(self.output_dir)
        except BaseException:
            ownership.release()
            raise
        return ownership, removed, last_size

    def _bounded_wait_s(self) -> float:
        """The longest a training-thread wait on a save may take: every phase has its own timeout."""
        return self.timeout_s + outcome_margin(self.timeout_s) + 60.0

    def _check_open(self) -> None:
        if self._saves.closed:
            raise CheckpointError(f"CheckpointManager for {self.output_dir} is closed")
