"""State fidelity at save: what would not load is refused when saved; what is saved loads as it was.

Issue 14, items 1-5: subclasses of plain types, keys that spell the same dotted path, dtypes
the fast torch writer did not know, quantized / sparse / ``__metadata__`` entries, and the
staging buffers of keys that are gone.
"""

from __future__ import annotations

import collections
import enum

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointSaveError, StateComponent
from async_ckpt.staging import StagingPool


class Holder:
    """A Stateful that returns ``state`` and records what ``load_state_dict`` got."""

    def __init__(self, state=None) -> None:
        self.state = state
        self.loaded = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state) -> None:
        self.loaded = state


def round_trip(tmp_path, state, file_format="torch"):
    """Save ``state`` as component 'c' (sync), load it into a fresh holder; return what it got."""
    with CheckpointManager(tmp_path, [StateComponent("c", Holder(state), file_format=file_format)], async_save=False) as mgr:
        mgr.save(1)
    back = Holder()
    with CheckpointManager(tmp_path, [StateComponent("c", back, file_format=file_format)]) as mgr:
        assert mgr.load().step == 1
    return back.loaded


def refused(tmp_path, state, file_format="torch") -> str:
    """Save ``state``; the save must fail and commit nothing. Returns the error text."""
    with CheckpointManager(tmp_path, [StateComponent("c", Holder(state), file_format=file_format)], async_save=False) as mgr:
        with pytest.raises(CheckpointSaveError) as info:
            mgr.save(1)
        assert mgr.latest() is None
    text = str(info.value)
    assert "UnsupportedStateError" in text and "Component 'c'" in text and "Fix:" in text, text
    return text


class Level(enum.IntEnum):
    HIGH = 2


class Mode(str, enum.Enum):
    TRAIN = "train"


class Plain(enum.Enum):
    A = 1


Point = collections.namedtuple("Point", "x y")


# ---------------------------------------------------------------- item 1: subclasses of plain types


@pytest.mark.parametrize(
    "value, plain",
    [
        (np.float64(1.5), 1.5),
        (np.float64("nan"), float("nan")),
        (Level.HIGH, 2),
        (Mode.TRAIN, "train"),
        (np.int64(7), 7),
        (np.float32(0.25), 0.25),
        (np.bool_(True), True),
        (np.str_("s"), "s"),
    ],
    ids=["np.float64", "nan", "IntEnum", "str-Enum", "np.int64", "np.float32", "np.bool_", "np.str_"],
)
def test_subclass_of_a_plain_type_is_saved_as_its_plain_value(tmp_path, value, plain):
    back = round_trip(tmp_path, {"nested": {"v": value, "l": [value]}})
    for got in (back["nested"]["v"], back["nested"]["l"][0]):
        assert type(got) is type(plain)
        assert got == plain or (got != got and plain != plain)


def test_subclass_keys_become_plain_keys(tmp_path):
    back = round_trip(tmp_path, {np.int64(3): 1, Mode.TRAIN: 2, Level.HIGH: torch.ones(1)})
    assert sorted(map(type, back), key=str) == [int, int, str] and back[3] == 1 and back["train"] == 2


class Tag(str):
    """A str subclass hashed by identity: a dict can hold Tag("train") and "train" apart."""

    __hash__ = object.__hash__


def test_keys_that_collide_once_plain_are_refused(tmp_path):
    text = refused(tmp_path, {"s": {Tag("train"): 1, "train": 2}})
    assert "'s'" in text and "distinct" in text


@pytest.mark.parametrize(
    "value, says",
    [
        (np.zeros(2), "torch.from_numpy"),
        (Point(1, 2), "namedtuple"),
        (Plain.A, "Plain"),
        (object(), "object"),
        (np.float64(1.0).astype(np.longdouble), "longdouble"),
        (torch.empty(2, device="meta"), "meta device"),
        (torch.zeros(2, dtype=torch.uint8).view(torch.uint4) if hasattr(torch, "uint4") else object(), "torch.save cannot"),
    ],
    ids=["ndarray", "namedtuple", "plain-Enum", "object", "longdouble", "meta", "uint4"],
)
def test_what_would_not_load_is_refused_at_save_naming_the_path(tmp_path, value, says):
    text = refused(tmp_path, {"outer": [0, {"inner": value}]})
    assert "'outer.1.inner'" in text
    if says != "torch.save cannot" or hasattr(torch, "uint4"):
        assert says in text


def test_refused_component_fails_the_save_and_the_next_one_succeeds(tmp_path):
    holder = Holder({"x": np.zeros(1)})
    with CheckpointManager(tmp_path, [StateComponent("c", holder)]) as mgr:
        handle = mgr.save(1)
        with pytest.raises(CheckpointSaveError, match="'x'"):
            handle.wait()
        holder.state = {"x": 1}
        assert mgr.save(2).wait() is not None
        assert [p.name for p in [mgr.latest()]] == ["checkpoint-2"]


# ---------------------------------------------------------------- item 2: one buffer per typed path


@pytest.mark.parametrize(
    "state",
    [
        {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}},
        {0: torch.zeros(2), "0": torch.ones(2)},
        {"x.1": torch.zeros(2), "x": [torch.full((2,), 5.0), torch.ones(2)]},
        {"t": (torch.zeros(2),), "t.0": torch.ones(2)},
        {1.0: torch.zeros(2), "1.0": torch.ones(2)},
    ],
    ids=["dotted-vs-nested", "int-vs-str", "dotted-vs-list", "tuple-vs-dotted", "float-vs-str"],
)
def test_keys_that_spell_the_same_dotted_path_keep_their_own_bytes(tmp_path, state):
    back = round_trip(tmp_path, state)
    want, got = _leaves(state), _leaves(back)
    assert len(want) == len(got)
    for (pw, w), (pg, g) in zip(want, got):
        assert pw == pg and torch.equal(w, g), pw


def _leaves(value, path=()):
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [leaf for k, v in items for leaf in _leaves(v, (*path, (type(k).__name__, k)))]


# ---------------------------------------------------------------- item 3: every dtype, both formats


def _dtypes():
    from async_ckpt.plain import SAVEABLE_DTYPES

    quantized = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}  # tensors of these: item 4
    return sorted(SAVEABLE_DTYPES - quantized, key=str)


def _sample(dtype: torch.dtype) -> torch.Tensor:
    if dtype is torch.bool:  # only 0 and 1 are bools
        return (torch.arange(6) % 2 == 0).reshape(2, 3)
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.arange(6 * size, dtype=torch.uint8).view(dtype).reshape(2, 3)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("file_format", ["torch", "safetensors"])
def test_every_dtype_round_trips_in_both_formats(tmp_path, file_format):
    state = {}
    for dtype in _dtypes():
        name = str(dtype).removeprefix("torch.")
        sample = _sample(dtype)
        state[name] = sample
        state[f"{name}_0dim"] = sample[0, 0].clone()
        state[f"{name}_empty"] = sample[:0]
        state[f"{name}_strided"] = sample.t()
    back = round_trip(tmp_path, state, file_format)
    assert back.keys() == state.keys()
    for name, want in state.items():
        assert _same_bits(back[name], want.contiguous()), name


# ---------------------------------------------------------------- item 4: quantized, sparse, __metadata__


def _quantized():
    return {
        "per_tensor": torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 3, torch.qint8),
        "per_channel": torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2], dtype=torch.float64),
                                                  torch.tensor([0, 1]), 0, torch.quint8),
        "qint32": torch.quantize_per_tensor(torch.randn(3), 0.5, 0, torch.qint32),
    }


def test_quantized_tensors_round_trip_in_torch_files(tmp_path):
    state = _quantized()
    back = round_trip(tmp_path, state)
    for name, want in state.items():
        got = back[name]
        assert got.is_quantized and got.qscheme() == want.qscheme() and got.dtype == want.dtype, name
        assert torch.equal(got.int_repr(), want.int_repr()) and torch.equal(got.dequantize(), want.dequantize()), name


def test_sparse_tensors_round_trip_in_torch_files(tmp_path):
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]])
    state = {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "uncoalesced": torch.sparse_coo_tensor([[0, 0]], [1.0, 2.0], (2,))}
    back = round_trip(tmp_path, state)
    for name, want in state.items():
        assert back[name].layout == want.layout, name
        assert torch.equal(back[name].to_dense(), want.to_dense()), name


@pytest.mark.parametrize(
    "entry, says",
    [
        ({"__metadata__": torch.zeros(2)}, "rename"),
        ({"s": torch.eye(2).to_sparse()}, "to_dense()"),
        ({"q": torch.quantize_per_tensor(torch.randn(2), 0.1, 0, torch.qint8)}, "dequantize()"),
        ({"n": {"nested": torch.ones(1)}}, "file_format='torch'"),
        ({0: torch.ones(1)}, "file_format='torch'"),
    ],
    ids=["__metadata__", "sparse", "quantized", "nested", "int-name"],
)
def test_safetensors_component_refuses_what_safetensors_cannot_hold(tmp_path, entry, says):
    text = refused(tmp_path, {"ok": torch.ones(2), **entry}, "safetensors")
    assert says in text


# ---------------------------------------------------------------- item 5: buffers of gone keys are freed


def test_buffers_of_keys_that_are_gone_are_released():
    pool = StagingPool(pin_memory=False)
    size = 64 * 1024 // 4  # 0.25 MiB of float32
    for i in range(40):
        pool.stage("c", {f"key{i}": torch.ones(size), "fixed": torch.ones(4)})
    assert pool.nbytes == (size + 4) * 4


def test_manager_host_memory_stays_flat_when_keys_change(tmp_path):
    holder = Holder()
    with CheckpointManager(tmp_path, [StateComponent("c", holder)], save_total_limit=1) as mgr:
        for i in range(10):
            holder.state = {"state": {i: torch.ones(1024)}, "step": i}
            mgr.save(i).wait()
        assert mgr._pool.nbytes == 1024 * 4
