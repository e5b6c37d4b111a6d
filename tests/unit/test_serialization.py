"""async_ckpt.serialization: safetensors compatible with the stock loader, tied weights, safe torch reads."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from async_ckpt.errors import CheckpointCorruptError, CheckpointError
from async_ckpt.serialization import (
    ALIASES_KEY,
    _DTYPES,
    read_safetensors,
    read_torch,
    split_aliases,
    tensor_bytes,
    write_safetensors,
    write_torch,
)
from async_ckpt.storage import write_file


class _Bytes:
    """A sink that collects the bytes (the serializers only need ``write``)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data) -> int:
        return self.buf.write(bytes(memoryview(data).cast("B")) if not isinstance(data, bytes) else data)

    def flush(self) -> None:
        pass


def _safetensors_bytes(state, **kw) -> bytes:
    sink = _Bytes()
    write_safetensors(sink, state, **kw)
    return sink.buf.getvalue()


def _all_dtypes_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for dtype in _DTYPES:
        if dtype is torch.bool:
            t = torch.rand(3, 4, generator=gen) > 0.5
        elif dtype.is_floating_point:
            t = torch.randn(3, 4, generator=gen).to(dtype)
        else:
            t = torch.randint(0, 100, (3, 4), generator=gen).to(dtype)
        state[f"w_{str(dtype).split('.')[-1]}"] = t
    state["scalar"] = torch.tensor(3.5)
    state["scalar_int"] = torch.tensor(7, dtype=torch.int64)
    state["empty"] = torch.zeros(0)
    state["empty_2d"] = torch.zeros(0, 5, dtype=torch.bfloat16)
    state["big"] = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    return state


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality for any dtype (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_stock_safetensors_loads_our_file(tmp_path):
    state = _all_dtypes_state()
    write_file(tmp_path, "model.safetensors", lambda sink: write_safetensors(sink, state))
    loaded = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert _equal(loaded[name], tensor), name
    assert loaded["scalar"].dim() == 0 and loaded["empty_2d"].shape == (0, 5)


def test_our_reader_matches_stock_writer():
    state = _all_dtypes_state()
    data = safetensors.torch.save(state)
    loaded = read_safetensors(data)
    for name, tensor in state.items():
        assert _equal(loaded[name], tensor), name


def test_round_trip_through_our_reader():
    state = _all_dtypes_state()
    loaded = read_safetensors(_safetensors_bytes(state))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert _equal(loaded[name], tensor), name


def test_header_is_eight_byte_aligned():
    data = _safetensors_bytes({"a": torch.ones(3)})
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    assert json.loads(data[8 : 8 + length])["a"]["dtype"] == "F32"


def test_non_contiguous_tensor_written_in_logical_order():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert not t.is_contiguous()
    loaded = safetensors.torch.load(_safetensors_bytes({"t": t}))
    assert torch.equal(loaded["t"], t)


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 11, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_stored_once_and_retied(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    state = model.state_dict()
    stored, aliases = split_aliases(state)
    assert aliases == {"out.weight": "emb.weight"}
    assert "out.weight" not in stored
    data = _safetensors_bytes(state)
    stock = safetensors.torch.load(data)
    assert "out.weight" not in stock  # stored once
    (length,) = struct.unpack("<Q", data[:8])
    assert json.loads(json.loads(data[8 : 8 + length])["__metadata__"][ALIASES_KEY]) == {"out.weight": "emb.weight"}
    assert len(data) < 8 + length + sum(t.numel() * t.element_size() for t in state.values())

    loaded = read_safetensors(data)
    assert loaded["out.weight"] is loaded["emb.weight"]
    assert torch.equal(loaded["emb.weight"], model.emb.weight.detach())

    torch.manual_seed(1)
    fresh = _Tied()
    assert not torch.equal(fresh.emb.weight, model.emb.weight)
    fresh.load_state_dict(loaded)
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    assert torch.equal(fresh.mid.weight, model.mid.weight)


def test_views_with_different_shape_are_not_aliases():
    base = torch.arange(6.0)
    stored, aliases = split_aliases({"a": base, "b": base.view(2, 3), "c": torch.zeros(0), "d": torch.zeros(0)})
    assert aliases == {} and list(stored) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("value", [[1, 2], 3, "text", {"nested": torch.ones(1)}])
def test_non_tensor_value_refused(value):
    with pytest.raises(CheckpointError, match="file_format='torch'") as info:
        _safetensors_bytes({"ok": torch.ones(1), "bad": value}, component="model")
    assert "'bad'" in str(info.value) and "'model'" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.complex32, torch.bits8, torch.float8_e8m0fnu])
def test_dtype_without_a_safetensors_code_round_trips(dtype):
    """complex128 and friends have no safetensors code: stored as their bytes, the dtype in the metadata."""
    source = torch.arange(3 * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8).view(dtype)
    back = read_safetensors(_safetensors_bytes({"c": source, "zero_dim": source[0].clone(), "empty": source[:0]}))
    for name, want in (("c", source), ("zero_dim", source[0]), ("empty", source[:0])):
        assert back[name].dtype == dtype and back[name].shape == want.shape, name
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -40])
def test_truncated_safetensors_refused(cut):
    data = _safetensors_bytes(_all_dtypes_state())
    with pytest.raises(CheckpointCorruptError, match="Cannot parse safetensors file"):
        read_safetensors(data[:cut], path="model.safetensors")


def test_garbage_safetensors_refused():
    with pytest.raises(CheckpointCorruptError):
        read_safetensors(struct.pack("<Q", 1 << 40) + b"{}", path="x")


def test_alias_to_missing_target_refused():
    header = {"__metadata__": {ALIASES_KEY: json.dumps({"b": "nope"})}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    data = struct.pack("<Q", len(encoded)) + encoded + b"\0" * 4
    with pytest.raises(CheckpointCorruptError, match="points to missing"):
        read_safetensors(data, path="x")


def test_malformed_alias_metadata_refused():
    data = safetensors.torch.save({"a": torch.ones(1)}, metadata={ALIASES_KEY: "not json"})
    with pytest.raises(CheckpointCorruptError):
        read_safetensors(data, path="x")


# ------------------------------------------------------------------------------ torch files


def test_torch_round_trip_with_plain_containers():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None, "flag": True}],
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    sink = _Bytes()
    write_torch(sink, state)
    loaded = read_torch(sink.buf.getvalue(), path="optimizer_state.pt")
    assert loaded["param_groups"] == state["param_groups"]
    assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert loaded["bf16"].dtype is torch.bfloat16


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_read_torch_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2), "payload": _Evil(marker)}, buf)
    with pytest.raises(CheckpointCorruptError, match="Refusing to load") as info:
        read_torch(buf.getvalue(), path=tmp_path / "optimizer_state.pt")
    assert "optimizer_state.pt" in str(info.value)
    assert not marker.exists()


def test_read_torch_garbage_and_truncated():
    sink = _Bytes()
    write_torch(sink, {"a": torch.arange(100)})
    data = sink.buf.getvalue()
    for bad in (b"", b"garbage bytes", data[: len(data) // 2]):
        with pytest.raises(CheckpointCorruptError):
            read_torch(bad, path="x.pt")


def test_tensor_bytes_of_bfloat16_and_empty():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert bytes(tensor_bytes(t)) == t.view(torch.uint8).numpy().tobytes()
    assert bytes(tensor_bytes(torch.zeros(0, 3))) == b""
    assert len(tensor_bytes(torch.tensor(1.0))) == 4
