"""Per-rank reports and one outcome that every rank sees: the c10d Store channel of a save.

Ranks coordinate through a c10d ``Store`` (the job's default store under a per-run prefix, or a
``HashStore`` for a single process), never through a collective, so this runs on each rank's
background commit thread (invariant 5). Every wait polls with a deadline (invariant 4).

Per save ``seq``::

    every rank   report(seq)  ──▶  rank 0  collect(seq)  ─ all ok ─▶ manifest, publish dir ─┐
    every rank   outcome(seq) ◀────────────────────────  publish(seq, ok | failure) ◀────────┘

Rank 0 waits on one counter (``<seq>/reported``, bumped with ``Store.add`` after each report)
rather than polling every rank's key, and reads all reports in one ``multi_get``: both cost
O(1) round trips per poll whatever the world size (perf/commit_cost.py, docs/parallelism.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointSaveError, CheckpointSpaceError, CheckpointTimeoutError, ReplicationValidationError

logger = logging.getLogger(__name__)

_POLL_MIN_S = 0.001
_POLL_MAX_S = 0.05
_COUNT_POLL_MAX_S = 0.01  # rank 0 polls one counter: cheap, so it may poll more often
_ERROR_TYPES = {
    "save": CheckpointSaveError,
    "timeout": CheckpointTimeoutError,
    "replication": ReplicationValidationError,
    "space": CheckpointSpaceError,
}


@dataclass
class Report:
    """What one rank tells rank 0 about its part of a save."""

    rank: int
    ok: bool
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> FileEntry fields
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    error: str = ""  # message naming rank, step, phase and path when not ok
    kind: str = "save"  # error type: "save" | "timeout" | "replication" | "space"


@dataclass
class Outcome:
    """What rank 0 publishes: the committed path, or the one error every rank raises."""

    ok: bool
    path: str = ""
    error: str = ""
    kind: str = "save"
    size_bytes: int = 0  # bytes of the committed checkpoint: the next save's free-space check

    def exception(self) -> CheckpointSaveError:
        return _ERROR_TYPES.get(self.kind, CheckpointSaveError)(self.error)


class CommitChannel:
    """The per-save key space on a Store: ``<seq>/report/<rank>`` and ``<seq>/outcome``.

    One instance per manager per rank. Its methods are called only by that rank's background
    commit thread (one save at a time), never by the training thread.
    """

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self._store = store
        self.rank = rank
        self.world_size = world_size

    def report(self, seq: int, report: Report) -> None:
        """Every rank: hand in this rank's report for save ``seq``. Does not block on other ranks.

        The counter is bumped after the report is stored, so a full count means every report can
        be read. Then this rank deletes its report of the save before, which rank 0 read before it
        published that save's outcome (every rank reports ``seq`` only after that outcome).
        """
        self._store.set(f"{seq}/report/{self.rank}", json.dumps(vars(report)))
        self._store.add(f"{seq}/reported", 1)
        self._delete([f"{seq - 1}/report/{self.rank}"] if seq > 0 else [])

    def collect(self, seq: int, timeout_s: float) -> list[Report]:
        """Rank 0: wait until every rank has reported ``seq`` or ``timeout_s`` passes.

        Raises ``CheckpointTimeoutError`` naming the ranks that did not report, or that withdrew
        their report: a rank that stopped waiting for this outcome (rank 0 was later than the
        timeout) deletes its report when it reports the next save, and this save then fails on
        rank 0 too, as it already did on that rank.
        """
        keys = [f"{seq}/report/{r}" for r in range(self.world_size)]
        counted = self._wait_count(f"{seq}/reported", self.world_size, timeout_s)
        # Not counted but every key there: a rank stored its report and died before counting it.
        missing = [] if self._store.check(keys) else [k for k in keys if not self._store.check([k])]
        if missing:
            ranks = ", ".join(k.rsplit("/", 1)[1] for k in missing)
            if counted:
                raise CheckpointTimeoutError(f"rank(s) {ranks} withdrew their report: they stopped waiting for rank 0's outcome")
            raise CheckpointTimeoutError(f"rank(s) {ranks} did not report within {timeout_s:g}s")
        multi_get = getattr(self._store, "multi_get", None)
        values = multi_get(keys) if multi_get is not None else [self._store.get(k) for k in keys]
        return [Report(**json.loads(v)) for v in values]

    def publish(self, seq: int, outcome: Outcome) -> None:
        """Rank 0: publish the outcome of ``seq`` and forget the outcome and counter of ``seq - 1``.

        Every rank reports ``seq`` only after it has read the outcome of ``seq - 1``, so once all
        reports of ``seq`` are in, nobody reads ``seq - 1``'s keys again. (Each rank deletes its
        own old report in ``report``, so this costs two deletes whatever the world size.)
        """
        self._store.set(f"{seq}/outcome", json.dumps(vars(outcome)))
        self._forget(seq - 1)

    def outcome(self, seq: int, timeout_s: float) -> Outcome:
        """Every rank but 0: wait for rank 0's outcome of ``seq``, at most ``timeout_s``.

        Raises ``CheckpointTimeoutError`` when rank 0 publishes nothing in time (it died or stalled).
        """
        if self._wait([f"{seq}/outcome"], timeout_s):
            raise CheckpointTimeoutError(f"rank 0 did not publish the outcome within {timeout_s:g}s (rank 0 died or stalled)")
        return Outcome(**json.loads(self._store.get(f"{seq}/outcome")))

    def _wait(self, keys: list[str], timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        pending = list(keys)
        delay = _POLL_MIN_S
        while True:
            pending = [k for k in pending if not self._store.check([k])]
            if not pending or time.monotonic() >= deadline:
                return pending
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _POLL_MAX_S)

    def _wait_count(self, key: str, count: int, timeout_s: float) -> bool:
        """Poll counter ``key`` until it reaches ``count`` (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        delay = _POLL_MIN_S
        while True:
            if self._store.add(key, 0) >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _COUNT_POLL_MAX_S)

    def _forget(self, seq: int) -> None:
        if seq >= 0:
            self._delete([f"{seq}/outcome", f"{seq}/reported"])

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._store.delete_key(key)
            except Exception:  # some stores cannot delete; the keys are small
                return


def first_failure(reports: list[Report]) -> Report | None:
    """The failed report of the lowest rank, if any (pure): the one error every rank will raise."""
    failed = [r for r in reports if not r.ok]
    return min(failed, key=lambda r: r.rank) if failed else None
