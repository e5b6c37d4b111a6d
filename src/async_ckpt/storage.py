"""Bytes on disk: atomic file writes with xxh3 and optional zstd, fsync, safe reads.

Everything here is synchronous and thread-safe per file: the background I/O threads call
``write_file`` concurrently for different files. Nothing here talks to other ranks. Directories
(staging, publishing, deleting) are ``rundir``'s.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from .errors import CheckpointCorruptError, CheckpointNotFoundError
from .layout import TMP_SUFFIX

logger = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes handed to hash/compress/write at a time
SMALL = 64 << 10  # writes below this are gathered into one buffer before they are emitted
CODECS = (None, "zstd")
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages in the range, do not wait


def _load_sync_file_range() -> Callable[[int, int, int], Any] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none. ctypes releases the GIL.

    Only a hint to start writeback: its result is ignored, and ``fsync`` still makes files durable.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        call.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_start_writeback = _load_sync_file_range()


@dataclass(frozen=True)
class WrittenFile:
    """What a finished write produced: the name, the bytes on disk and their xxh3."""

    name: str
    size: int  # bytes on disk (after compression)
    xxh3: str  # xxh3-64 hex digest of the bytes on disk
    codec: str | None  # None or "zstd"


class FileSink:
    """A write-only file object that hashes, optionally compresses, and writes to a descriptor.

    Accepts anything with the buffer protocol; large buffers (tensor views) are written in
    ``CHUNK`` slices straight from memory, without an intermediate copy. Small writes (a zip
    writer's record headers, small tensors) are gathered and emitted together: each emit is a
    hash update and a system call that hands the GIL to the training thread and back, and a
    torch file of a few hundred tensors made a thousand of them. Used by one I/O thread at a
    time; xxhash, zstd and ``os.write`` release the GIL on large buffers.
    """

    def __init__(self, fd: int, codec: str | None = None, level: int = 1) -> None:
        self._fd = fd
        self._hash = xxhash.xxh3_64()
        self._compressor = zstandard.ZstdCompressor(level=level).compressobj() if codec == "zstd" else None
        self._small = bytearray()  # small writes not yet emitted
        self.size = 0
        self.os_error: OSError | None = None  # the disk's own error, kept: torch.save hides it
        self._kicked = 0  # bytes whose writeback has been started (see _emit)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) < SMALL:
            self._small += view
            if len(self._small) >= SMALL:
                self._drain()
            return len(view)
        self._drain()
        self._put(view)
        return len(view)

    def flush(self) -> None:
        """Nothing to do: bytes go to the descriptor as they arrive (``close`` ends the stream)."""

    def close(self) -> str:
        """Emit what is gathered, end the compressed stream, return the hex digest of it all."""
        self._drain()
        if self._compressor is not None:
            self._emit(self._compressor.flush())
            self._compressor = None
        return self._hash.hexdigest()

    def _drain(self) -> None:
        if self._small:
            gathered, self._small = self._small, bytearray()
            self._put(memoryview(gathered))

    def _put(self, view: memoryview) -> None:
        for start in range(0, len(view), CHUNK):
            chunk = view[start : start + CHUNK]
            self._emit(self._compressor.compress(chunk) if self._compressor else chunk)

    def _emit(self, data: Any) -> None:
        if not len(data):
            return
        self._hash.update(data)
        view = memoryview(data)
        try:
            while len(view):
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self.os_error = exc
            raise
        self.size += len(data)
        if _start_writeback is not None and self.size - self._kicked >= CHUNK:
            # Start writing what is in the page cache now, while the rest is produced: the final
            # fsync then waits for the last chunk only, not for the whole file (a hint; fsync
            # still makes it durable).
            _start_writeback(self._fd, self._kicked, self.size - self._kicked)
            self._kicked = self.size


def write_file(directory: Path, name: str, produce: Callable[[FileSink], None], *, codec: str | None = None, level: int = 1) -> WrittenFile:
    """Write ``directory/name`` atomically: temp name, stream through ``produce``, fsync, rename.

    Called on a background I/O thread. Blocks on disk I/O. On any error the temporary file is
    removed and the error propagates; the final name never holds a partial file.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")
    final = directory / name
    tmp = directory / (name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    sink = FileSink(fd, codec, level)
    try:
        produce(sink)
        digest = sink.close()
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        if sink.os_error is not None and exc is not sink.os_error:
            raise sink.os_error from exc  # e.g. ENOSPC, not torch's "enforce fail" wrapper
        raise
    os.close(fd)
    os.replace(tmp, final)
    return WrittenFile(name=name, size=sink.size, xxh3=digest, codec=codec)


def safe_member(directory: Path, name: str) -> Path:
    """Return ``directory/name`` for a file name read from a manifest, refusing escapes.

    The name must be a plain file name (no separators, no ``..``, not absolute, no NUL), and the
    entry, if present, must be a regular file and not a symlink.
    """
    bad = (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    )
    if bad:
        raise CheckpointCorruptError(f"Refusing manifest file name {name!r}: it is not a plain file name (path: {directory})")
    path = directory / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointCorruptError(f"Refusing {path}: not a regular file (symlinks and devices are never read)")
    return path


def read_file(path: Path, *, size: int, xxh3: str | None, codec: str | None) -> bytes:
    """Read a checkpoint file, check its size (and hash when given), and decompress it.

    The size is checked with ``fstat`` before anything is read, so a file whose manifest entry
    declares a huge size cannot make us allocate it. Called on the training thread at load.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Missing checkpoint file {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointCorruptError(f"Refusing {path}: it is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        actual = os.fstat(handle.fileno()).st_size
        if actual != size:
            raise CheckpointCorruptError(f"Size mismatch for {path}: manifest says {size} bytes, file has {actual}")
        data = handle.read()
    if len(data) != size:
        raise CheckpointCorruptError(f"Short read of {path}: expected {size} bytes, got {len(data)}")
    if xxh3 is not None and xxhash.xxh3_64_hexdigest(data) != xxh3:
        raise CheckpointCorruptError(f"Hash mismatch for {path}: the file's bytes do not match the manifest's xxh3")
    if codec == "zstd":
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        try:
            plain = decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise CheckpointCorruptError(f"Cannot decompress {path}: {exc}") from None
        if not decompressor.eof or decompressor.unused_data:
            raise CheckpointCorruptError(f"Cannot decompress {path}: the zstd stream is truncated or has trailing bytes")
        return plain
    if codec is not None:
        raise CheckpointCorruptError(f"Unknown codec {codec!r} for {path}")
    return data


def hash_file(path: Path) -> tuple[int, str]:
    """Return ``(size, xxh3 hex)`` of a file's bytes, read in chunks."""
    digest = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
