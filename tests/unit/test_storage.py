"""async_ckpt.storage: atomic writes with xxh3 and zstd, safe reads, publishing a directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zstandard

from async_ckpt import storage
from async_ckpt.errors import CheckpointCorruptError, CheckpointNotFoundError
from async_ckpt.serialization import tensor_bytes
from async_ckpt.storage import FileSink, hash_file, read_file, safe_member, write_file

_DATA = bytes(range(256)) * 1000 + b"tail"


def _write(tmp_path: Path, data: bytes = _DATA, codec: str | None = None, name: str = "f.bin"):
    return write_file(tmp_path, name, lambda sink: sink.write(data), codec=codec)


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_write_file_round_trip(tmp_path, codec):
    written = _write(tmp_path, codec=codec)
    path = tmp_path / "f.bin"
    assert written.name == "f.bin" and written.codec == codec
    assert (written.size, written.xxh3) == hash_file(path)
    assert written.size == path.stat().st_size
    assert written.xxh3 == xxhash.xxh3_64_hexdigest(path.read_bytes())
    assert read_file(path, size=written.size, xxh3=written.xxh3, codec=codec) == _DATA
    if codec == "zstd":
        assert written.size < len(_DATA)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()) == _DATA
    else:
        assert path.read_bytes() == _DATA
    assert not (tmp_path / "f.bin.tmp").exists()


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_write_in_many_pieces_and_empty(tmp_path, codec):
    pieces = [b"", b"a", bytearray(b"bc"), memoryview(b"def"), b""]
    written = write_file(tmp_path, "p", lambda sink: [sink.write(p) for p in pieces], codec=codec)
    assert read_file(tmp_path / "p", size=written.size, xxh3=written.xxh3, codec=codec) == b"abcdef"
    empty = write_file(tmp_path, "e", lambda sink: None, codec=codec)
    assert read_file(tmp_path / "e", size=empty.size, xxh3=empty.xxh3, codec=codec) == b""


def test_write_file_overwrites_atomically(tmp_path):
    _write(tmp_path, b"old")
    written = _write(tmp_path, b"new contents")
    assert (tmp_path / "f.bin").read_bytes() == b"new contents"
    assert written.size == len(b"new contents")


@pytest.mark.parametrize("exc", [OSError("disk died"), KeyboardInterrupt()])
def test_failure_inside_produce_leaves_no_file(tmp_path, exc):
    def produce(sink):
        sink.write(b"partial bytes")
        raise exc

    with pytest.raises(type(exc)):
        write_file(tmp_path, "f.bin", produce)
    assert list(tmp_path.iterdir()) == []


def test_failure_inside_produce_keeps_previous_final(tmp_path):
    _write(tmp_path, b"previous")

    def produce(sink):
        sink.write(b"partial")
        raise OSError("boom")

    with pytest.raises(OSError):
        write_file(tmp_path, "f.bin", produce)
    assert (tmp_path / "f.bin").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_unknown_codec_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown codec"):
        write_file(tmp_path, "f", lambda sink: None, codec="gzip")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ read_file


def test_read_size_mismatch(tmp_path):
    written = _write(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="Size mismatch"):
        read_file(tmp_path / "f.bin", size=written.size + 1, xxh3=written.xxh3, codec=None)
    with pytest.raises(CheckpointCorruptError, match="Size mismatch"):
        read_file(tmp_path / "f.bin", size=1 << 60, xxh3=None, codec=None)  # huge declared size: refused, not allocated


def test_read_hash_mismatch(tmp_path):
    written = _write(tmp_path)
    path = tmp_path / "f.bin"
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="Hash mismatch"):
        read_file(path, size=written.size, xxh3=written.xxh3, codec=None)
    assert read_file(path, size=written.size, xxh3=None, codec=None) == bytes(data)  # no hash given: not checked


def test_read_symlink_refused(tmp_path):
    written = _write(tmp_path)
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "f.bin")
    with pytest.raises(CheckpointCorruptError, match="symlink"):
        read_file(link, size=written.size, xxh3=written.xxh3, codec=None)


def test_read_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="Missing checkpoint file"):
        read_file(tmp_path / "nope", size=1, xxh3=None, codec=None)


def test_read_corrupt_zstd(tmp_path):
    garbage = b"this is not a zstd frame at all" * 3
    (tmp_path / "g.zst").write_bytes(garbage)
    with pytest.raises(CheckpointCorruptError, match="Cannot decompress"):
        read_file(tmp_path / "g.zst", size=len(garbage), xxh3=None, codec="zstd")


def test_read_truncated_zstd_refused(tmp_path):
    written = _write(tmp_path, codec="zstd")
    path = tmp_path / "f.bin"
    cut = path.read_bytes()[: written.size // 2]
    path.write_bytes(cut)
    with pytest.raises(CheckpointCorruptError):
        read_file(path, size=len(cut), xxh3=None, codec="zstd")


def test_read_unknown_codec(tmp_path):
    written = _write(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="Unknown codec"):
        read_file(tmp_path / "f.bin", size=written.size, xxh3=None, codec="lz4")


# ------------------------------------------------------------------------------ safe_member


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "x\x00", "a\\b"])
def test_safe_member_refuses_escapes(tmp_path, name):
    with pytest.raises(CheckpointCorruptError, match="not a plain file name"):
        safe_member(tmp_path, name)


def test_safe_member_refuses_directories_and_symlinks(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "missing-target")  # even a dangling link
    for name in ("d", "l"):
        with pytest.raises(CheckpointCorruptError, match="not a regular file"):
            safe_member(tmp_path, name)
    assert safe_member(tmp_path, "absent.pt") == tmp_path / "absent.pt"
    (tmp_path / "ok.pt").write_bytes(b"x")
    assert safe_member(tmp_path, "ok.pt") == tmp_path / "ok.pt"


# ------------------------------------------------------------------------------ FileSink


def test_file_sink_writes_tensor_memory(tmp_path):
    tensors = [
        torch.arange(1000, dtype=torch.float32),
        torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4),
        torch.tensor(7, dtype=torch.int64),
        torch.zeros(0),
        torch.tensor([True, False]),
    ]
    fd = os.open(tmp_path / "t.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = FileSink(fd)
        for t in tensors:
            view = tensor_bytes(t)
            if t.numel():
                assert view.obj is not None  # a view of the tensor's memory, not a bytes copy
            assert sink.write(view) == t.numel() * t.element_size()
        digest = sink.close()
    finally:
        os.close(fd)
    expected = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"" for t in tensors)
    assert (tmp_path / "t.bin").read_bytes() == expected
    assert sink.size == len(expected)
    assert digest == xxhash.xxh3_64_hexdigest(expected)


def test_tensor_bytes_shares_memory():
    t = torch.arange(8, dtype=torch.int32)
    view = tensor_bytes(t)
    t[0] = 0x01020304
    assert bytes(view[:4]) == (0x01020304).to_bytes(4, "little")


def test_file_sink_large_buffer_chunks(tmp_path, monkeypatch):
    from async_ckpt import storage

    monkeypatch.setattr(storage, "CHUNK", 1000)  # many chunks, same bytes
    data = os.urandom(10_500)
    for codec in (None, "zstd"):
        written = write_file(tmp_path, f"c{codec}", lambda sink: sink.write(data), codec=codec)
        assert (written.size, written.xxh3) == hash_file(tmp_path / f"c{codec}")
        assert read_file(tmp_path / f"c{codec}", size=written.size, xxh3=written.xxh3, codec=codec) == data


def test_small_writes_are_gathered_in_order_with_large_ones(tmp_path, monkeypatch):
    """Record headers and small tensors go out in few system calls; order and hash unchanged."""
    calls = []
    real_write = storage.os.write
    monkeypatch.setattr(storage.os, "write", lambda fd, data: calls.append(len(data)) or real_write(fd, data))
    pieces = [bytes([i % 251]) * (i % 300 + 1) for i in range(2000)]  # ~300 KiB in 2000 writes
    big = np.random.default_rng(0).integers(0, 255, size=storage.SMALL * 3, dtype=np.uint8).tobytes()
    order = pieces[:1000] + [big] + pieces[1000:]

    def produce(sink):
        for piece in order:
            sink.write(piece)

    written = storage.write_file(tmp_path, "f.bin", produce)
    expected = b"".join(order)
    assert (tmp_path / "f.bin").read_bytes() == expected
    assert written.size == len(expected) and written.xxh3 == xxhash.xxh3_64_hexdigest(expected)
    assert len(calls) < 20  # not one per write
