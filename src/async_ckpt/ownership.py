"""One live job owns a run directory: an ``flock`` on ``<output_dir>/async_ckpt.lock``, and a lease.

Rank 0 of a job calls ``acquire`` on its training thread at manager construction (before start-up
recovery touches anything) and holds the returned ``Ownership`` for the job's life; ``release``
at ``close()``. Other ranks never take it: a job owns its directory once. ``async-ckpt clean``
takes it for the length of its run. Nothing here talks to other ranks.

How a successor knows the owner is gone:

- **Same host** (what a requeue on the same node, or a second command, sees): the kernel drops
  an ``flock`` when its process dies, SIGKILL and OOM included. Takeover is immediate.
- **Another host** on shared storage (NFS, Lustre), where ``flock`` may be local to each client
  or absent: the lock file holds a lease that the owner's ``async_ckpt-lease`` thread renews
  every ``lease_s / 6``. A successor takes over a foreign record once it has seen it unchanged for
  ``lease_s`` (default ``LEASE_S`` = 30 s) on its own clock, or at once when the record's wall-clock
  renewal time is more than ``2 * lease_s`` old. The lease is renewed by its own thread, not the
  commit thread, because one save can take longer than a lease.
- A lock file that says ``released`` (a clean ``close()``) is free at once, from any host.

The lock file is never deleted or replaced (a new inode would be a second lock); its content is
one JSON record (host, pid, since, renewed, lease_s, released) rewritten in place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CheckpointDirectoryError, CheckpointLockError
from .layout import LOCK_NAME

logger = logging.getLogger(__name__)

LEASE_S = 30.0  # a foreign record not renewed for this long is a dead owner's
RECORD_BYTES = 512  # the record is padded to this size and rewritten in place
POLL_S = 0.2


@dataclass
class Holder:
    """What the lock file says about its owner."""

    host: str
    pid: int
    since: float  # wall-clock time the owner took the directory
    renewed: float  # wall-clock time of the last renewal
    count: int = 0  # renewals so far: a successor watches it change
    lease_s: float = LEASE_S
    released: bool = False

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since} (lease renewed {max(0.0, time.time() - self.renewed):.0f} s ago)"


def read_holder(output_dir: Path) -> Holder | None:
    """The record in ``output_dir``'s lock file, or None when there is none or it does not parse."""
    try:
        raw = (Path(output_dir) / LOCK_NAME).read_bytes().strip()
        return Holder(**json.loads(raw)) if raw else None
    except (OSError, ValueError, TypeError):
        return None


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: someone holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Watch:
    """A successor's view of a foreign record: when it last saw it change, on its own clock."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.changed = time.monotonic()

    def stale(self, holder: Holder) -> bool:
        key = (holder.host, holder.pid, holder.since, holder.count)
        if key != self.key:
            self.key, self.changed = key, time.monotonic()
        return time.monotonic() - self.changed >= holder.lease_s or time.time() - holder.renewed > 2 * holder.lease_s


def _free(holder: Holder | None, locked: bool | None, host: str, watch: _Watch) -> bool:
    """Whether the directory may be taken, given what flock said and what the record says."""
    if locked is False:
        return False  # the kernel (or the NFS server) says the owner lives
    if holder is None or holder.released:
        return True
    if holder.host == host:
        return locked is True or not _pid_alive(holder.pid)
    return watch.stale(holder)


class Ownership:
    """A held run directory. ``renew`` and ``release`` may be called from any thread."""

    def __init__(self, fd: int, path: Path, holder: Holder, renew: bool) -> None:
        self._fd, self.path, self.holder = fd, path, holder
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._write()
        if renew:
            self._thread = threading.Thread(target=self._renew_loop, name="async_ckpt-lease", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        data = json.dumps(asdict(self.holder)).encode().ljust(RECORD_BYTES)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def renew(self) -> None:
        """Rewrite the lease with a new renewal time. The lease thread calls it; blocks on the disk."""
        with self._lock:
            if self._fd < 0:
                return
            self.holder.renewed, self.holder.count = time.time(), self.holder.count + 1
            self._write()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.holder.lease_s / 6):
            try:
                self.renew()
            except OSError as exc:  # logged; the lease lapses only if this goes on for lease_s
                logger.error("[rank 0] could not renew the lease on %s: %s", self.path, exc)

    def release(self) -> None:
        """Mark the record released and drop the lock. Idempotent; training thread at ``close()``."""
        self._stop.set()
        with self._lock:
            if self._fd < 0:
                return
            try:
                self.holder.released = True
                self._write()
            except OSError as exc:
                logger.warning("[rank 0] could not mark %s released (a successor on another host waits for the lease): %s", self.path, exc)
            finally:
                os.close(self._fd)  # closing the descriptor drops the flock
                self._fd = -1


def acquire(output_dir: Path, timeout_s: float, *, lease_s: float = LEASE_S, renew: bool = True, host: str | None = None) -> Ownership:
    """Take ``output_dir`` for this process, waiting up to ``timeout_s`` for a live owner to go.

    Rank 0's training thread at construction (or the CLI). Blocks, polling every ``POLL_S``.
    Raises ``CheckpointDirectoryError`` when the lock file cannot be created (the directory is
    not writable) and ``CheckpointLockError`` naming the holder when it is still held at the end.
    """
    host = host or socket.gethostname()
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise CheckpointDirectoryError(f"Cannot write to the run directory {output_dir}: {exc.strerror or exc} (path: {path}); "
                                       "choose an output_dir on a writable file system") from None
    deadline = time.monotonic() + timeout_s
    watch, logged = _Watch(), False
    try:
        while True:
            locked = _try_flock(fd)
            holder = read_holder(Path(output_dir))
            if _free(holder, locked, host, watch):
                if holder is not None and not holder.released:
                    logger.warning("[rank 0] taking over %s from a job that is gone (%s)", output_dir, holder.describe())
                now = time.time()
                return Ownership(fd, path, Holder(host=host, pid=os.getpid(), since=now, renewed=now, lease_s=lease_s), renew)
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if time.monotonic() >= deadline:
                raise CheckpointLockError(_busy_message(output_dir, holder, timeout_s, host))
            if not logged:
                logger.info("[rank 0] %s is owned by another job (%s): waiting up to %g s for it to end",
                            output_dir, holder.describe() if holder else "no record yet", timeout_s)
                logged = True
            time.sleep(POLL_S)
    except BaseException:
        os.close(fd)
        raise


def _busy_message(output_dir: Path, holder: Holder | None, timeout_s: float, host: str) -> str:
    who = holder.describe() if holder else "a process that wrote no record"
    if holder is not None and holder.host == host and holder.pid == os.getpid():
        fix = "this process already has a CheckpointManager on it: close() that one first"
    else:
        fix = ("another job is using it: wait for it to end, stop it, or use another output_dir "
               "(lock_timeout_s / save_lock_timeout_s waits longer)")
    return f"Run directory {output_dir} is owned by {who}; waited {timeout_s:g} s. {fix}"


def describe_holder(output_dir: Path) -> str:
    """One line about the lock file's record, for messages and the CLI."""
    holder = read_holder(Path(output_dir))
    return holder.describe() if holder else "no owner recorded"

