"""State dicts to and from bytes: safetensors for flat tensor dicts, torch files for the rest.

Writers stream into a ``FileSink`` straight from the staged tensors' memory (no serialized copy
of the whole state); readers never unpickle arbitrary objects (safetensors, or
``torch.load(weights_only=True)``). Called on background I/O threads (write) and on the training
thread (read).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from . import torchfile
from .errors import CheckpointCorruptError, CheckpointError

logger = logging.getLogger(__name__)

ALIASES_KEY = "async_ckpt.aliases"  # safetensors metadata: {alias name: stored name} for tied tensors

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including bfloat16)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def split_aliases(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Separate tied tensors: the first name of each shared tensor is stored, the rest alias it.

    Two names alias when they are the same tensor object or views of the same memory with the
    same shape, stride and dtype (the staging pool already maps tied weights to one buffer).
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype) if tensor.numel() else (id(tensor),)
        if ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
            stored[name] = tensor
    return stored, aliases


def write_safetensors(sink: Any, state: Mapping[str, Any], *, component: str = "model") -> None:
    """Stream a flat ``{name: tensor}`` dict in the safetensors format into ``sink``.

    Tensors must be contiguous CPU tensors (the staged buffers are). Tied tensors are written
    once; their other names go into the metadata and are restored by ``read_safetensors``.
    """
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"Component '{component}' cannot be written as safetensors: entry {name!r} is a "
                f"{type(value).__name__}, not a tensor. Use StateComponent(..., file_format='torch')."
            )
        if value.dtype not in _DTYPES:
            raise CheckpointError(f"Component '{component}': dtype {value.dtype} of {name!r} has no safetensors code.")
    stored, aliases = split_aliases(state)
    header: dict[str, Any] = {}
    if aliases:
        header["__metadata__"] = {ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    offset = 0
    for name, tensor in stored.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    sink.write(struct.pack("<Q", len(encoded)))
    sink.write(encoded)
    for tensor in stored.values():
        sink.write(tensor_bytes(tensor.contiguous()))


def read_safetensors(data: bytes, *, path: Any = None) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict, re-tying aliased names."""
    try:
        state = safetensors.torch.load(data)
        aliases = json.loads(_safetensors_metadata(data).get(ALIASES_KEY, "{}"))
        if not isinstance(aliases, dict):
            raise ValueError(f"{ALIASES_KEY} is not an object")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointCorruptError(f"Cannot parse safetensors file {path}: {exc}") from None
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointCorruptError(f"Safetensors file {path}: alias {alias!r} points to missing {target!r}")
        state[alias] = state[target]
    return state


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, torch.Tensor)


def check_plain(state: Any, *, component: str, path: str = "") -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse, before it is written.

    A checkpoint that commits but can never load is worse than a save that fails: the error names
    the component and where in its state dict the offending value sits.
    """
    if isinstance(state, _PLAIN_LEAVES):
        return
    if type(state) in (dict, OrderedDict):
        for key, value in state.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"Component '{component}': key {key!r} at '{path or '<root>'}' is a {type(key).__name__}; use str or int keys.")
            check_plain(value, component=component, path=f"{path}.{key}" if path else str(key))
        return
    if type(state) in (list, tuple, set):
        for index, value in enumerate(state):
            check_plain(value, component=component, path=f"{path}.{index}" if path else str(index))
        return
    raise CheckpointError(
        f"Component '{component}': value at '{path or '<root>'}' is a {type(state).__module__}.{type(state).__qualname__}, "
        "which torch.load(weights_only=True) refuses. Return tensors and plain containers "
        "(dict, list, tuple, str, int, float, bool, None) from state_dict()."
    )


def write_torch(sink: Any, state: Any, *, component: str = "?") -> None:
    """``torch.save`` a state made of plain containers and tensors into ``sink``.

    Written by ``torchfile.save`` (the same format, without CRC32 and with far less Python per
    tensor, which matters because the training thread waits for the GIL meanwhile); plain
    ``torch.save`` where this torch's zip writer differs or a tensor is not a dense CPU one.
    """
    check_plain(state, component=component)
    if torchfile.writer_available():
        try:
            return torchfile.save(state, sink)
        except torchfile.Unsupported as exc:  # raised before anything is written
            logger.debug("component %r: %s; writing it with torch.save", component, exc)
    torch.save(state, sink)


def read_torch(data: bytes, *, path: Any = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointCorruptError(
            f"Refusing to load {path}: it holds objects that are not plain containers or tensors "
            f"(weights_only=True rejected it: {_reason(exc)})"
        ) from None
    except Exception as exc:
        raise CheckpointCorruptError(f"Cannot read torch file {path}: {type(exc).__name__}: {exc}") from None


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    picked = [line for line in lines if "Unsupported" in line or "global" in line.lower()]
    return (picked or lines or ["unpickling refused"])[0]
