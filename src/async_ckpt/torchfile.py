"""``torch.save``'s file format for tensors and plain containers, with less Python per object.

Why: the background I/O threads share the GIL with the training thread, and ``torch.save``
spends most of a small file's time in Python: its pickler calls a Python ``persistent_id`` with
two type checks for every object it pickles (about 20 per optimizer tensor) and reduces each
tensor through ``Tensor.__reduce_ex__``. Every millisecond of that is a millisecond the training
thread may wait for the GIL while a save is in flight. Here a tensor is reduced by a
``dispatch_table`` entry (called for tensors only) and ``persistent_id`` is one type check.

The records are the ones ``torch._save`` writes (``data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/<key>``) through torch's own zip writer, with
CRC32 off: ``torch.load`` never checks it and the manifest's xxh3 covers every byte. The pickle is
byte for byte the one ``torch.save`` writes (tested). Only dense CPU tensors of the exact
``torch.Tensor`` type are handled; ``writer_available`` says whether this torch's private zip
writer works as used here (checked once by a round trip), and callers fall back to
``torch.save`` otherwise. Tensors of the dtypes ``torch.save`` stores untyped (float8, uint16-64,
bits, complex32) are written as it writes them (``_rebuild_tensor_v3``). Runs on background I/O
threads; it touches no other rank.
"""

from __future__ import annotations

import copyreg
import functools
import io
import logging
import pickle
import sys
from collections import OrderedDict
from typing import Any

import torch

logger = logging.getLogger(__name__)


class Unsupported(Exception):
    """A value this writer does not reduce itself (the caller uses ``torch.save`` instead)."""


class _StorageRef:
    """Stands for a tensor's storage in the pickle; ``persistent_id`` turns it into torch's id."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple) -> None:
        self.pid = pid


@functools.cache
def _storage_type(dtype: torch.dtype) -> Any:
    """``torch.FloatStorage`` for float32 and so on: the class name ``torch.save`` pickles."""
    return getattr(torch, torch.empty(0, dtype=dtype)._typed_storage()._pickle_storage_type())


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: self._reduce_tensor,
                               torch.UntypedStorage: _refuse_storage, torch.storage.TypedStorage: _refuse_storage}
        self.storages: dict[int, tuple[str, torch.UntypedStorage, torch.dtype]] = {}

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if type(obj) is _StorageRef else None

    def _reduce_tensor(self, tensor: torch.Tensor) -> tuple:
        if tensor.device.type != "cpu" or tensor.layout is not torch.strided or tensor.is_quantized or tensor.is_nested:
            raise Unsupported(f"a {tensor.layout} tensor on {tensor.device}")
        storage = tensor.untyped_storage()
        untyped = tensor.dtype in _UNTYPED  # float8, uint16..64, bits: torch.save writes them as v3
        as_dtype = torch.uint8 if untyped else tensor.dtype  # what torch.save's shared-storage check compares
        key, _, dtype = self.storages.setdefault(storage._cdata, (str(len(self.storages)), storage, as_dtype))
        if dtype != as_dtype:
            raise Unsupported("one storage viewed as two dtypes")
        if untyped:
            pid = ("storage", torch.UntypedStorage, key, "cpu", storage.nbytes())
        else:
            pid = ("storage", _storage_type(tensor.dtype), key, "cpu", storage.nbytes() // tensor.element_size())
        args: tuple = (_StorageRef(pid), tensor.storage_offset(), tuple(tensor.size()), tensor.stride(), tensor.requires_grad, OrderedDict())
        if untyped:
            args += (tensor.dtype,)
        metadata = torch._utils.get_tensor_metadata(tensor)
        rebuild = torch._utils._rebuild_tensor_v3 if untyped else torch._utils._rebuild_tensor_v2
        return rebuild, args + (metadata,) if metadata else args


def _refuse_storage(storage: Any) -> tuple:
    raise Unsupported(f"a bare {type(storage).__name__} (or a tensor subclass holding one)")


def _untyped_dtypes() -> frozenset:
    """The dtypes ``torch.save`` writes as an ``UntypedStorage`` with ``_rebuild_tensor_v3``."""
    try:
        return frozenset(torch.storage._new_dtypes())
    except AttributeError:  # an older torch: none, or a KeyError in _storage_type sends it to torch.save
        return frozenset()


_UNTYPED = _untyped_dtypes()


def save(state: Any, sink: Any) -> None:
    """Write ``state`` into ``sink`` as ``torch.save`` would, without CRC32.

    Raises ``Unsupported`` before anything is written if the state holds a tensor it does not
    reduce itself.
    """
    data = io.BytesIO()
    pickler = _Pickler(data)
    try:
        pickler.dump(state)
    except KeyError as exc:  # a dtype this torch has no storage type for
        raise Unsupported(f"no storage type for a dtype ({exc})") from None
    alignment = torch.serialization._get_storage_alignment()
    writer = torch._C.PyTorchFileWriter(sink, False, alignment)
    value = data.getvalue()
    writer.write_record("data.pkl", value, len(value))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", str(alignment), len(str(alignment)))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for key, storage, _ in pickler.storages.values():
        writer.write_record(f"data/{key}", storage, storage.nbytes())
    writer.write_end_of_file()
    sink.flush()


@functools.cache
def writer_available() -> bool:
    """Whether ``save`` works with this torch (checked once, by a round trip through ``torch.load``)."""
    try:
        buffer = io.BytesIO()
        probe = {"t": torch.arange(6, dtype=torch.float32)[1:4], "b": torch.ones(2, dtype=torch.bfloat16), "n": [1, "x", None]}
        save(probe, buffer)
        back = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        return back["n"] == probe["n"] and torch.equal(back["t"], probe["t"]) and torch.equal(back["b"], probe["b"])
    except Exception as exc:  # an older or newer torch: torch.save still works
        logger.debug("fast torch file writer unavailable (%s: %s); using torch.save", type(exc).__name__, exc)
        return False
