"""async_ckpt.store_channel: the report/collect/publish/outcome protocol on a real c10d HashStore.

Threads stand in for ranks: each has its own CommitChannel on one shared store.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict

import pytest
import torch.distributed as dist

from async_ckpt.store_channel import CommitChannel, Outcome, Report, first_failure
from async_ckpt.errors import CheckpointSaveError, CheckpointTimeoutError, ReplicationValidationError


def _channels(world: int):
    store = dist.HashStore()
    return store, [CommitChannel(store, rank, world) for rank in range(world)]


def _report(rank: int, ok: bool = True, **kw) -> Report:
    files = {f"f{rank}.pt": {"size": rank + 1, "xxh3": "00", "codec": None, "rank": rank, "component": "c", "slot": f"rank:{rank}"}}
    return Report(rank=rank, ok=ok, files=files if ok else {}, **kw)


@pytest.mark.timeout(60)
def test_all_report_collect_returns_reports_in_rank_order():
    _, chans = _channels(4)
    threads = [threading.Thread(target=chans[r].report, args=(0, _report(r, timings={"persist_s": 0.1 * r}))) for r in (3, 1, 2, 0)]
    for t in threads:
        t.start()
    reports = chans[0].collect(0, timeout_s=10)
    for t in threads:
        t.join()
    assert [r.rank for r in reports] == [0, 1, 2, 3]
    assert reports[2].files == {"f2.pt": {"size": 3, "xxh3": "00", "codec": None, "rank": 2, "component": "c", "slot": "rank:2"}}
    assert reports[3].timings == {"persist_s": pytest.approx(0.3)}
    assert first_failure(reports) is None


@pytest.mark.timeout(60)
def test_collect_waits_for_late_reports():
    _, chans = _channels(2)
    chans[0].report(0, _report(0))

    def late():
        time.sleep(0.1)
        chans[1].report(0, _report(1))

    thread = threading.Thread(target=late)
    thread.start()
    assert [r.rank for r in chans[0].collect(0, timeout_s=10)] == [0, 1]
    thread.join()


@pytest.mark.timeout(60)
def test_missing_rank_times_out_naming_it():
    _, chans = _channels(4)
    for r in (0, 1, 3):
        chans[r].report(0, _report(r))
    started = time.monotonic()
    with pytest.raises(CheckpointTimeoutError, match=r"rank\(s\) 2 did not report within 0.3s"):
        chans[0].collect(0, timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5.0


@pytest.mark.timeout(60)
def test_several_missing_ranks_all_named():
    _, chans = _channels(3)
    chans[0].report(5, _report(0))
    with pytest.raises(CheckpointTimeoutError, match=r"rank\(s\) 1, 2 "):
        chans[0].collect(5, timeout_s=0.3)


@pytest.mark.timeout(60)
def test_reports_of_other_saves_do_not_count():
    _, chans = _channels(2)
    chans[0].report(1, _report(0))
    chans[1].report(0, _report(1))  # rank 1 reported an older save only
    with pytest.raises(CheckpointTimeoutError, match=r"rank\(s\) 1 "):
        chans[0].collect(1, timeout_s=0.3)


@pytest.mark.timeout(60)
def test_outcome_reaches_every_rank():
    _, chans = _channels(3)
    got: dict[int, Outcome] = {}

    def wait(rank):
        got[rank] = chans[rank].outcome(0, timeout_s=10)

    threads = [threading.Thread(target=wait, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    chans[0].publish(0, Outcome(ok=True, path="/out/checkpoint-3"))
    for t in threads:
        t.join()
    assert got[1] == got[2] == Outcome(ok=True, path="/out/checkpoint-3")


@pytest.mark.timeout(60)
def test_outcome_times_out_when_rank0_never_publishes():
    _, chans = _channels(2)
    started = time.monotonic()
    with pytest.raises(CheckpointTimeoutError, match="rank 0 did not publish"):
        chans[1].outcome(0, timeout_s=0.3)
    assert 0.25 <= time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "kind,error_type",
    [("save", CheckpointSaveError), ("timeout", CheckpointTimeoutError), ("replication", ReplicationValidationError), ("bogus", CheckpointSaveError)],
)
def test_outcome_exception_types(kind, error_type):
    exc = Outcome(ok=False, error="[rank 1 step 4] boom", kind=kind).exception()
    assert type(exc) is error_type and str(exc) == "[rank 1 step 4] boom"


@pytest.mark.timeout(60)
def test_failure_outcome_is_the_same_on_every_rank():
    _, chans = _channels(3)
    chans[0].report(0, _report(0))
    chans[1].report(0, _report(1))
    chans[2].report(0, _report(2, ok=False, error="[rank 2 step 9 phase write] disk full"))
    failed = first_failure(chans[0].collect(0, timeout_s=5))
    assert failed is not None and failed.rank == 2
    chans[0].publish(0, Outcome(ok=False, error=failed.error, kind=failed.kind))
    seen = [chans[r].outcome(0, timeout_s=5) for r in (1, 2)]
    assert seen[0] == seen[1] and not seen[0].ok
    assert str(seen[0].exception()) == "[rank 2 step 9 phase write] disk full"


def test_first_failure_picks_lowest_failing_rank():
    reports = [_report(0), _report(3, ok=False, error="three"), _report(1, ok=False, error="one", kind="replication"), _report(2)]
    failed = first_failure(reports)
    assert failed is not None and failed.rank == 1 and failed.error == "one" and failed.kind == "replication"
    assert first_failure([_report(0), _report(1)]) is None
    assert first_failure([]) is None


@pytest.mark.timeout(60)
def test_publish_forgets_previous_save_keys():
    store, chans = _channels(2)
    for seq in (0, 1):
        for r in (0, 1):
            chans[r].report(seq, _report(r))
        chans[0].collect(seq, timeout_s=5)
        chans[0].publish(seq, Outcome(ok=True, path=f"p{seq}"))
        assert chans[1].outcome(seq, timeout_s=5).path == f"p{seq}"
    assert not store.check(["0/outcome"]) and not store.check(["0/report/0"]) and not store.check(["0/report/1"])
    assert store.check(["1/outcome"]) and store.check(["1/report/1"])
    assert not store.check(["0/reported"]) and store.check(["1/reported"])  # the report counter too


class CountingStore:
    """A HashStore that counts the calls rank 0's wait makes."""

    def __init__(self) -> None:
        self.inner = dist.HashStore()
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args)

        return counted


@pytest.mark.timeout(60)
def test_collect_polls_one_counter_and_reads_all_reports_at_once():
    store = CountingStore()
    world = 64
    chans = [CommitChannel(store, rank, world) for rank in range(world)]

    def late():
        time.sleep(0.1)
        for rank in range(world):
            chans[rank].report(0, _report(rank))

    thread = threading.Thread(target=late)
    thread.start()
    reports = chans[0].collect(0, timeout_s=10)
    thread.join()
    assert [r.rank for r in reports] == list(range(world))
    assert store.calls.get("check", 0) == 1 and store.calls.get("get", 0) == 0  # one check of all keys, no per-rank reads
    assert store.calls["multi_get"] == 1
    assert store.calls["add"] < world + 40  # one per report, plus rank 0's polls of the counter


@pytest.mark.timeout(60)
def test_a_report_stored_but_not_counted_still_commits_after_the_timeout():
    store, chans = _channels(2)
    chans[0].report(0, _report(0))
    store.set("0/report/1", json.dumps(asdict(_report(1))))  # rank 1 died between set and add
    assert [r.rank for r in chans[0].collect(0, timeout_s=0.3)] == [0, 1]



@pytest.mark.timeout(60)
def test_each_rank_deletes_its_own_previous_report_and_rank0_only_two_keys():
    store = CountingStore()
    world = 16
    chans = [CommitChannel(store, rank, world) for rank in range(world)]
    for seq in (0, 1):
        for rank in range(world):
            chans[rank].report(seq, _report(rank))
            assert not store.check([f"{seq - 1}/report/{rank}"])  # gone as soon as the rank reports again
        chans[0].collect(seq, timeout_s=5)
        before = store.calls.get("delete_key", 0)
        chans[0].publish(seq, Outcome(ok=True, path=f"p{seq}"))
        assert store.calls.get("delete_key", 0) - before == (2 if seq else 0)
    assert all(store.check([f"1/report/{rank}"]) for rank in range(world))  # the last save's reports stay


@pytest.mark.timeout(60)
def test_a_report_withdrawn_by_a_rank_that_moved_on_fails_the_save_on_rank0_too():
    _, chans = _channels(3)
    for r in range(3):
        chans[r].report(0, _report(r))
    chans[2].report(1, _report(2))  # rank 2 gave up waiting for outcome 0 and reported save 1
    with pytest.raises(CheckpointTimeoutError, match=r"rank\(s\) 2 withdrew their report"):
        chans[0].collect(0, timeout_s=5)
