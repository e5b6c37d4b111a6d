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
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from . import plain, torchfile
from .errors import CheckpointCorruptError

logger = logging.getLogger(__name__)

ALIASES_KEY = "async_ckpt.aliases"  # safetensors metadata: {alias name: stored name} for tied tensors

DTYPES_KEY = "async_ckpt.dtypes"  # safetensors metadata: {name: torch dtype} for dtypes with no safetensors code


def _safetensors_codes() -> dict[torch.dtype, str]:
    """The dtypes this safetensors reads back natively, with their codes (its own table where it has one)."""
    table = getattr(safetensors.torch, "_TYPES", None)
    if isinstance(table, dict) and table:
        return {dtype: code for code, dtype in table.items()}
    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, name):
            codes[getattr(torch, name)] = code
    return codes


_DTYPES = _safetensors_codes()


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

    Tensors must be dense CPU tensors (the staged buffers are) under str names other than
    ``__metadata__`` (``plain.check_flat``). Tied tensors are written once; their other names go
    into the metadata and are restored by ``read_safetensors``, as are dtypes with no safetensors
    code (``_as_raw_bytes``).
    """
    for name, value in state.items():
        plain.check_flat(component, name, value)
    stored, aliases = split_aliases(state)
    stored, raw = _as_raw_bytes(stored)
    header: dict[str, Any] = {}
    metadata = {}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    if raw:
        metadata[DTYPES_KEY] = json.dumps(raw, sort_keys=True)
    if metadata:
        header["__metadata__"] = metadata
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
        metadata = _safetensors_metadata(data)
        aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
        dtypes = json.loads(metadata.get(DTYPES_KEY, "{}"))
        if not isinstance(aliases, dict) or not isinstance(dtypes, dict):
            raise ValueError(f"{ALIASES_KEY} or {DTYPES_KEY} is not an object")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointCorruptError(f"Cannot parse safetensors file {path}: {exc}") from None
    for name, dtype in dtypes.items():
        state[name] = _from_raw_bytes(state.get(name), dtype, name, path)
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointCorruptError(f"Safetensors file {path}: alias {alias!r} points to missing {target!r}")
        state[alias] = state[target]
    return state


def _as_raw_bytes(stored: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of dtypes with no safetensors code (complex128, float8_e8m0fnu, bits, ...) as uint8.

    Each becomes a ``uint8`` tensor of shape ``[*shape, element_size]`` holding its bytes, and its
    dtype goes into the metadata (``DTYPES_KEY``); ``read_safetensors`` views it back. A stock
    loader sees the uint8 tensor, never wrong numbers under the right name and dtype.
    """
    raw = {name: str(t.dtype).removeprefix("torch.") for name, t in stored.items() if t.dtype not in _DTYPES}
    if not raw:
        return stored, raw
    out = dict(stored)
    for name in raw:
        tensor = stored[name].contiguous()
        out[name] = tensor.reshape(-1).view(torch.uint8).reshape(*tensor.shape, tensor.element_size())
    return out, raw


def _from_raw_bytes(tensor: Any, dtype_name: Any, name: str, path: Any) -> torch.Tensor:
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype) or not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 \
            or not tensor.dim() or tensor.shape[-1] != torch.empty(0, dtype=dtype).element_size():
        raise CheckpointCorruptError(f"Safetensors file {path}: {DTYPES_KEY} entry {name!r}: {dtype_name!r} does not match the tensor")
    return tensor.reshape(-1).view(dtype).reshape(tensor.shape[:-1])


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def write_torch(sink: Any, state: Any, *, component: str = "?") -> None:
    """``torch.save`` a state made of plain containers and tensors into ``sink``.

    ``state`` is a staged copy (``StagingPool.plan``), whose walk already refused or converted
    every value ``torch.load(weights_only=True)`` would refuse (``plain``): no second walk here.

    Written by ``torchfile.save`` (the same format, without CRC32 and with far less Python per
    tensor, which matters because the training thread waits for the GIL meanwhile); plain
    ``torch.save`` where this torch's zip writer differs or a tensor is not a dense CPU one.
    """
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
