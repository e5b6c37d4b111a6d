"""async_ckpt.ownership: the flock, the lease record, and when a successor may take over.

flock conflicts between two descriptors of one process too, so these run in-process; a record
written "by another host" stands for an owner whose flock this machine cannot see.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from async_ckpt import CheckpointDirectoryError, CheckpointLockError
from async_ckpt.layout import LOCK_NAME
from async_ckpt.ownership import RECORD_BYTES, acquire, read_holder


def _foreign(tmp_path, **fields) -> None:
    now = time.time()
    record = {"host": "other-node", "pid": 4242, "since": now, "renewed": now, "count": 0, "lease_s": 0.6, "released": False, **fields}
    (tmp_path / LOCK_NAME).write_bytes(json.dumps(record).encode().ljust(RECORD_BYTES))


def test_acquire_records_the_owner_and_release_frees_it(tmp_path):
    owned = acquire(tmp_path, 0, renew=False)
    holder = read_holder(tmp_path)
    assert holder.pid == os.getpid() and not holder.released
    owned.release()
    owned.release()  # idempotent
    assert read_holder(tmp_path).released
    acquire(tmp_path, 0, renew=False).release()


def test_a_held_directory_is_refused_after_the_timeout_naming_the_holder(tmp_path):
    owned = acquire(tmp_path, 0, renew=False)
    try:
        with pytest.raises(CheckpointLockError, match=rf"owned by host .*, pid {os.getpid()}, since .*close\(\) that one first"):
            acquire(tmp_path, 0.3, renew=False)
    finally:
        owned.release()


def test_a_waiting_successor_proceeds_when_the_owner_releases(tmp_path):
    owned = acquire(tmp_path, 0, renew=False)
    threading.Timer(0.5, owned.release).start()
    acquire(tmp_path, 30, renew=False).release()


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    _foreign(tmp_path, host=__import__("socket").gethostname(), pid=2**22 + 12345, lease_s=3600)
    acquire(tmp_path, 0, renew=False).release()


def test_a_foreign_lease_is_taken_over_once_it_stops_changing(tmp_path):
    _foreign(tmp_path)
    with pytest.raises(CheckpointLockError, match="other-node, pid 4242"):
        acquire(tmp_path, 0.2, renew=False)
    owned = acquire(tmp_path, 10, renew=False)  # unchanged for lease_s (0.6 s): its owner is gone
    assert read_holder(tmp_path).pid == os.getpid()
    owned.release()


def test_a_foreign_lease_long_past_its_renewal_is_taken_over_at_once(tmp_path):
    _foreign(tmp_path, renewed=time.time() - 10)
    acquire(tmp_path, 0, renew=False).release()


def test_a_foreign_lease_that_is_renewed_is_never_taken(tmp_path):
    _foreign(tmp_path)
    stop = threading.Event()

    def renew() -> None:
        count = 0
        while not stop.wait(0.1):
            count += 1
            _foreign(tmp_path, count=count)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        with pytest.raises(CheckpointLockError, match="other-node"):
            acquire(tmp_path, 1.5, renew=False)
    finally:
        stop.set()
        thread.join()


def test_the_owner_renews_its_lease(tmp_path):
    owned = acquire(tmp_path, 0, lease_s=0.3)
    try:
        first = read_holder(tmp_path).count
        deadline = time.monotonic() + 10
        while read_holder(tmp_path).count == first:
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.05)
    finally:
        owned.release()
    assert read_holder(tmp_path).released


def test_an_unwritable_directory_is_a_directory_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointDirectoryError, match="Cannot write to the run directory"):
        acquire(tmp_path / "afile", 0)
