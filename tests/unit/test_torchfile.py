"""async_ckpt.torchfile: torch.save's format, byte for byte, from a cheaper pickler.

The optimizer file is written on a background thread that shares the GIL with training, so the
writer avoids torch's per-object Python; these tests hold it to torch.save's exact bytes (CRC32
fields aside) for every kind of value a state dict holds, and to torch.save as a fallback.
"""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict

import pytest
import torch

from async_ckpt import torchfile
from async_ckpt.serialization import read_torch, write_torch


class _Sink:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data) -> int:
        return self.buf.write(bytes(memoryview(data).cast("B")))

    def flush(self) -> None:
        pass


def _records(data: bytes) -> dict[str, tuple[int, bytes]]:
    """{record: (CRC32 field, bytes)}, the per-save random serialization id left out."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            crc, info.CRC = info.CRC, None  # zipfile checks CRC32 only when the entry has one
            if not info.filename.endswith("serialization_id"):
                out[info.filename.split("/", 1)[1]] = (crc, archive.open(info).read())
    return out


def _state() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(3, 5), "exp_avg_sq": torch.rand(7)} for i in range(4)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1, 2, 3], "foreach": None, "fused": False, "name": "all"}],
        "dtypes": {"bf16": torch.ones(3, dtype=torch.bfloat16), "f16": torch.zeros(2, dtype=torch.float16), "i64": torch.arange(5), "bool": torch.tensor([True, False]), "u8": torch.arange(4, dtype=torch.uint8)},
        "views": {"whole": base, "row": base[1], "transposed": base.t(), "tail": base.view(-1)[5:]},  # one storage, four views
        "empty": torch.empty(0, 3), "scalar": torch.tensor(7), "conj": torch.tensor([1 + 2j]).conj(),
        "ordered": OrderedDict([("b", torch.ones(1)), ("a", 2)]),
        "plain": [1, 2.5, "s", None, True, (3, 4)], "meta": {"dtype": torch.float32, "device": torch.device("cpu"), "size": torch.Size([2, 3])},
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
    }


def test_same_records_as_torch_save_without_crc32():
    state = _state()
    ours, theirs = _Sink(), io.BytesIO()
    torchfile.save(state, ours)
    torch.save(state, theirs)
    mine, stock = _records(ours.buf.getvalue()), _records(theirs.getvalue())
    assert list(mine) == list(stock)  # same records, same order
    assert {k: v for k, (_, v) in mine.items()} == {k: v for k, (_, v) in stock.items()}  # data.pkl byte for byte
    assert all(crc == 0 for crc, _ in mine.values()) and any(crc for crc, _ in stock.values())


def test_loads_back_with_weights_only_and_keeps_shared_storage():
    state = _state()
    sink = _Sink()
    write_torch(sink, state)
    back = read_torch(sink.buf.getvalue())
    assert back["param_groups"] == state["param_groups"] and back["plain"] == state["plain"] and back["meta"] == state["meta"]
    for name in ("whole", "row", "transposed", "tail"):
        assert torch.equal(back["views"][name], state["views"][name])
    assert back["views"]["row"].untyped_storage().data_ptr() == back["views"]["whole"].untyped_storage().data_ptr()
    assert back["dtypes"]["bf16"].dtype is torch.bfloat16 and back["conj"].is_conj() and torch.equal(back["conj"].resolve_conj(), state["conj"].resolve_conj())
    assert isinstance(back["parameter"], torch.nn.Parameter) and torch.equal(back["parameter"], state["parameter"])


def test_tensors_it_does_not_reduce_fall_back_to_torch_save():
    sparse = torch.randn(4, 4).to_sparse()
    with pytest.raises(torchfile.Unsupported):
        torchfile.save({"x": sparse}, _Sink())
    sink = _Sink()
    write_torch(sink, {"x": sparse, "y": torch.ones(2)})
    back = torch.load(io.BytesIO(sink.buf.getvalue()), weights_only=True)
    assert torch.equal(back["x"].to_dense(), sparse.to_dense()) and torch.equal(back["y"], torch.ones(2))


def test_one_storage_as_two_dtypes_is_refused_like_torch_save():
    base = torch.zeros(4)
    state = {"f": base, "i": base.view(torch.int32)}
    with pytest.raises(torchfile.Unsupported):
        torchfile.save(state, _Sink())
    with pytest.raises(RuntimeError, match="different types"):
        write_torch(_Sink(), state)  # the fallback: torch.save's own error


def test_torch_file_falls_back_to_torch_save_where_the_writer_differs(monkeypatch):
    """A torch whose private zip writer takes other arguments: plain torch.save, same state back."""

    class _OtherWriter:
        def __init__(self, *args):
            raise TypeError("incompatible constructor arguments")

    torchfile.writer_available.cache_clear()
    monkeypatch.setattr(torch._C, "PyTorchFileWriter", _OtherWriter)
    try:
        assert not torchfile.writer_available()
        monkeypatch.undo()  # torch.save itself needs the real writer
        sink = _Sink()
        write_torch(sink, {"w": torch.arange(5)})
        assert torch.equal(read_torch(sink.buf.getvalue())["w"], torch.arange(5))
        assert any(crc != 0 for crc, _ in _records(sink.buf.getvalue()).values())  # torch.save's CRC
    finally:
        torchfile.writer_available.cache_clear()
    assert torchfile.writer_available()
