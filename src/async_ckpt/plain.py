"""What a checkpoint may hold: the type rules, applied while the staging walk copies the state.

A value is written only if ``torch.load(weights_only=True)`` (torch files) or stock safetensors
(safetensors files) gives it back; everything else is refused when it is saved, never committed
to be refused at load. The rules (docs/format.md, "What comes back as what"):

- plain leaves (None, bool, int, float, complex, str, bytes, bytearray, torch.dtype,
  torch.device, torch.layout, torch.Size) and tensors are kept;
- a value of a subclass of int, float, complex, str or bytes (``IntEnum``, a ``str`` Enum,
  ``numpy.float64``) is saved as its plain value, and so is a NumPy scalar (``numpy.int64`` ->
  int), when that value is equal to it; a frozenset becomes a set, another Mapping a dict,
  a list or tuple subclass a list or tuple;
- anything else (a NumPy array, a namedtuple, an arbitrary object, a tensor subclass, a dtype
  ``torch.save`` cannot write) raises ``UnsupportedStateError`` naming the component, the key
  path and what to do.

Pure functions, called on the training thread by ``StagingPool.plan`` for the leaves its walk
does not handle itself; nothing here runs for plain values (the hot path).
"""

from __future__ import annotations

import sys

from collections.abc import Sequence
from typing import Any

import torch

from .errors import UnsupportedStateError

ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout, torch.Size})
KEY_TYPES = frozenset({str, int, float, bool, type(None)})
_SCALARS = (bool, int, float, complex, str, bytes)


def _saveable_dtypes() -> frozenset:
    """The dtypes ``torch.save`` can write (the sub-byte ``int1``..``uint7`` have no storage type)."""
    try:
        return frozenset(torch.storage._dtype_to_storage_type_map()) | frozenset(torch.storage._new_dtypes())
    except AttributeError:  # another torch: trust it
        return frozenset(v for v in vars(torch).values() if isinstance(v, torch.dtype))


SAVEABLE_DTYPES = _saveable_dtypes()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """A DTensor, told without importing torch.distributed (this runs on writer threads too)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def show(path: Sequence[Any]) -> str:
    """A typed key path as the dotted text messages use (``state.0.exp_avg``; ``<root>`` if empty)."""
    return ".".join(repr(k) if isinstance(k, str) and ("." in k or not k) else str(k) for k in path) or "<root>"


def refuse(component: str, path: Sequence[Any], what: str, fix: str) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"Component '{component}': the value at '{show(path)}' {what}, so a checkpoint holding it could not be "
        f"loaded; it was not saved. Fix: {fix}."
    )


def plain_leaf(value: Any, component: str, path: Sequence[Any]) -> Any:
    """The plain value to save for a leaf that is not an exact plain type, or raise.

    Called by the staging walk for leaves whose type is not in ``ATOMS`` and that are not a
    container or tensor it handles (a subclass of a plain type, a NumPy value, anything else).
    """
    if isinstance(value, _SCALARS):
        base = next(b for b in _SCALARS if isinstance(value, b))
        plain = _base_value(value, base)
        if _same(plain, value):
            return plain
        raise refuse(component, path, f"is a {_name(value)} that is not equal to its plain {base.__name__} value",
                     f"store {base.__name__}(value) or another plain value from state_dict()")
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            raise refuse(component, path, f"is a numpy.ndarray ({value.dtype}), which torch.load(weights_only=True) refuses",
                         "store torch.from_numpy(array) (or array.tolist()) in state_dict()")
        if isinstance(value, np.generic):
            plain = value.item()
            if type(plain) in ATOMS and _same(plain, value):
                return plain
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        raise refuse(component, path, f"is a namedtuple ({_name(value)}), which torch.load(weights_only=True) refuses",
                     "store tuple(value) or value._asdict() in state_dict() and rebuild it in load_state_dict()")
    raise refuse(component, path, f"is a {_name(value)}, which torch.load(weights_only=True) refuses",
                 "return tensors and plain containers (dict, list, tuple, set, str, int, float, bool, None) from "
                 "state_dict(), or wrap the object in a Stateful that does")


def plain_key(key: Any, component: str, path: Sequence[Any]) -> Any:
    """The plain dict key to save for ``key`` (whose type is not in ``KEY_TYPES``), or raise."""
    if isinstance(key, (int, float, str)) or type(key).__module__.split(".")[0] == "numpy":
        try:
            plain = plain_leaf(key, component, path)
        except UnsupportedStateError:
            plain = None
        if type(plain) in KEY_TYPES:
            return plain
    raise refuse(component, [*path, key], f"has a key of type {_name(key)}", "use str or int keys")


def check_tensor(tensor: torch.Tensor, component: str, path: Sequence[Any]) -> None:
    """Refuse a tensor no file format gives back; called for tensors that are not plain dense ones."""
    if tensor.dtype not in SAVEABLE_DTYPES:
        raise refuse(component, path, f"has dtype {tensor.dtype}, which torch.save cannot write",
                     "store it in a dtype torch.save supports (e.g. packed into torch.uint8)")
    if tensor.device.type == "meta":
        raise refuse(component, path, "is a tensor on the meta device, which holds no data",
                     "materialize it (to_empty() and initialize) before saving")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and not tensor.is_nested and not _is_dtensor(tensor):
        raise refuse(component, path, f"is a tensor subclass {_name(tensor)}, which torch.load(weights_only=True) refuses",
                     "store its plain data (e.g. tensor.as_subclass(torch.Tensor) or the subclass's inner tensors)")


def check_flat(component: str, key: Any, value: Any) -> None:
    """The safetensors rules for one top-level entry: a dense tensor under a str name, not ``__metadata__``."""
    use_torch = "use StateComponent(..., file_format='torch')"
    if not isinstance(key, str):
        raise refuse(component, [key], f"is named by a {type(key).__name__}; safetensors names are str", use_torch)
    if key == "__metadata__":
        raise refuse(component, [key], "is named '__metadata__', which safetensors reserves for its header",
                     f"rename the entry, or {use_torch}")
    if not isinstance(value, torch.Tensor):
        raise refuse(component, [key], f"is a {_name(value)}, not a tensor; safetensors holds a flat dict of tensors",
                     use_torch)
    if value.layout is not torch.strided or value.is_nested:
        raise refuse(component, [key], f"is a {value.layout} tensor; safetensors holds dense tensors only",
                     f"store value.to_dense(), or {use_torch}")
    if value.is_quantized:
        raise refuse(component, [key], f"is a quantized tensor ({value.qscheme()}); safetensors cannot hold its scales",
                     f"store value.dequantize() or value.int_repr() with the scales, or {use_torch}")


def _base_value(value: Any, base: type) -> Any:
    if base is str:
        return str.__str__(value)
    if base is bytes:
        return bytes(value)
    return base(value)


def _same(plain: Any, value: Any) -> bool:
    try:
        return bool(plain == value) or (plain != plain and value != value)  # NaN equals nothing
    except Exception:  # noqa: BLE001 - an __eq__ that raises: not the same
        return False


def _name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
