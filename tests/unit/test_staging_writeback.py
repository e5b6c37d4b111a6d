"""From staging buffers to disk: the sink starts writeback early, over every byte once, in order.

``FileSink`` asks the kernel (``sync_file_range``) to start writing each ``CHUNK`` it has
written, so the final fsync of a large checkpoint file waits for the last chunk only. This is a
hint: the file must come out byte-identical, and a platform without the call must work alike.
"""

from __future__ import annotations

import os

import pytest
import torch

from async_ckpt import storage
from async_ckpt.serialization import tensor_bytes


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_writeback_covers_the_file_once_in_order(tmp_path, monkeypatch, codec):
    calls = []
    real = storage._start_writeback
    monkeypatch.setattr(storage, "_start_writeback", lambda fd, offset, nbytes: calls.append((offset, nbytes)) or (real and real(fd, offset, nbytes)))
    data = torch.randn(3 * storage.CHUNK // 4 + 12345)  # three chunks and a bit
    written = storage.write_file(tmp_path, "t.bin", lambda sink: sink.write(tensor_bytes(data)), codec=codec)
    if codec is None:
        assert (tmp_path / "t.bin").read_bytes() == bytes(tensor_bytes(data))
        assert len(calls) == 3
    offsets = [offset for offset, _ in calls]
    assert offsets == sorted(offsets) and offsets[:1] == [0]
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))  # contiguous, no overlap
    assert sum(n for _, n in calls) <= written.size


def test_without_sync_file_range_the_file_is_the_same(tmp_path, monkeypatch):
    data = torch.arange(storage.CHUNK // 2, dtype=torch.float32)
    with_hint = storage.write_file(tmp_path, "a.bin", lambda sink: sink.write(tensor_bytes(data)))
    monkeypatch.setattr(storage, "_start_writeback", None)
    without = storage.write_file(tmp_path, "b.bin", lambda sink: sink.write(tensor_bytes(data)))
    assert with_hint.xxh3 == without.xxh3 and with_hint.size == without.size == os.path.getsize(tmp_path / "b.bin")
