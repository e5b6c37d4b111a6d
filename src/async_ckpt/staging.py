"""Point-in-time copies of state into host buffers that are allocated once and reused.

``StagingPool.stage`` is called on the training thread inside ``save()``: it copies every tensor
of a state dict into a buffer kept from the previous save (same component, path, shape and
dtype), copies the containers, keeps the plain leaves (refusing or converting, by ``plain``'s
rules, what would not load), and returns the copy. On CUDA the buffers are pinned and the copies are issued non-blocking on a side stream, synchronised before the copy is handed over.
The background threads read the returned copy while the training thread goes on; the pool must
not be staged into again until they are done (the manager guarantees it: one save holds the
buffers at a time).

A stage is two halves: ``plan`` (training thread: walk the state, pick buffers, copy the
containers, decide what to skip) and ``StagePlan.run`` (the tensor bytes; any thread). Overlap
mode (``BackgroundSnapshot``) runs the second half on a helper thread while forward and backward
compute.

Incremental staging (opt-in per call, ``frozen=``): a frozen parameter whose storage, layout and
version counter are unchanged since its buffer was filled is not copied again; the buffer
already holds its bytes. torch bumps the version counter on every in-place op through the
parameter or a view of it, but not on writes through ``.data``, NumPy, DLPack or raw storage,
nor inside fused optimizer kernels: hence frozen parameters only (``frozen_identities``), never
parameters an optimizer holds, and the ``verify`` mode that checks the skipped bytes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import plain
from .errors import CheckpointError

logger = logging.getLogger(__name__)

SMALL_TENSOR_BYTES = 1 << 20  # overlap mode copies tensors below this on the training thread


@dataclass
class PoolStats:
    """Counters that tests and benchmarks read: allocations must stop after the first save."""

    allocations: int = 0  # buffers created since the pool was built
    bytes_allocated: int = 0  # their total size
    bytes_copied: int = 0  # bytes the last plan()/stage() copies into buffers
    bytes_skipped: int = 0  # bytes the last plan()/stage() left in place (unchanged frozen tensors)
    total_copied: int = 0  # bytes_copied summed over every plan since the pool was built
    total_skipped: int = 0  # bytes_skipped summed likewise


@dataclass(frozen=True)
class _Fill:
    """What a buffer holds: the bytes of this source tensor at this version."""

    storage: weakref.ref  # the source's storage (dead or different: a new tensor)
    layout: tuple  # storage offset, shape, stride, dtype
    version: int


@dataclass
class _Copy:
    source: torch.Tensor
    buffer: torch.Tensor
    where: tuple[str, tuple]  # (component key, typed key path)
    version: int | None  # the source's version counter when planned (None: inference tensor)


@dataclass
class StagePlan:
    """One component's stage: the copy's structure now, its tensor bytes once ``run`` returns."""

    pool: StagingPool
    staged: Any = None  # the point-in-time copy; its tensors are the pool's buffers
    copies: list[_Copy] = field(default_factory=list)
    cuda_ready: Any = None  # an event on the training stream: the copies start after it

    def run(self, part: str = "all") -> None:
        """Copy the planned tensors into their buffers; blocks until they are complete.

        ``part``: "all", or "small" / "large" (split at ``SMALL_TENSOR_BYTES``) for overlap
        mode. Training thread, or the overlap helper thread while the training thread
        computes. Records what each buffer now holds, for incremental staging.
        """
        chosen = self._part(part)
        stream = None
        for item in chosen:
            self.pool._filled.pop(item.where, None)  # a failed copy leaves nothing to trust
            if item.source.is_cuda:
                stream = self.pool._side_stream(item.source.device)
                if self.cuda_ready is not None:
                    stream.wait_event(self.cuda_ready)
                with torch.cuda.stream(stream):
                    item.buffer.copy_(item.source, non_blocking=True)
            else:
                item.buffer.copy_(item.source)
        if stream is not None:
            stream.synchronize()
        for item in chosen:
            if item.version is not None:
                self.pool._filled[item.where] = _Fill(weakref.ref(item.source.untyped_storage()), _layout(item.source), item.version)

    def changed(self, part: str = "all") -> list[str]:
        """Paths (of ``part``) whose source changed, by its version counter, since ``plan``: a torn copy."""
        return [f"{c.where[0]}.{plain.show(c.where[1])}" for c in self._part(part) if c.version is not None and _version(c.source) != c.version]

    def _part(self, part: str) -> list[_Copy]:
        if part == "all":
            return self.copies
        return [c for c in self.copies if (_nbytes(c.buffer) < SMALL_TENSOR_BYTES) == (part == "small")]

    def forget(self) -> None:
        """Trust none of this plan's buffers for incremental staging (after a torn copy)."""
        for item in self.copies:
            self.pool._filled.pop(item.where, None)


class StagingPool:
    """Reusable host buffers, keyed by (component, typed key path in the state dict), kept while shape and dtype match."""

    def __init__(self, pin_memory: bool | None = None, *, verify_incremental: bool = False) -> None:
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._verify = verify_incremental  # compare the bytes of every skipped tensor (debug)
        self._buffers: dict[str, dict[tuple, torch.Tensor]] = {}  # component -> typed key path -> buffer
        self._filled: dict[tuple[str, tuple], _Fill] = {}
        self._stream: Any = None
        self.stats = PoolStats()

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        return sum(_nbytes(buf) for buffers in self._buffers.values() for buf in buffers.values())

    def stage(self, key: str, state: Any, *, frozen: Collection[tuple] = (), flat: bool = False) -> Any:
        """Return a point-in-time copy of ``state`` whose tensors live in this pool's buffers.

        Called on the training thread. Blocks until every copy (including device-to-host copies
        on CUDA) has finished. Tensors that share memory (tied weights) share one buffer in the
        copy, so ties survive. ``frozen``: identities (``frozen_identities``) of tensors that
        may be left in place when unchanged since their buffer was filled.
        """
        plan = self.plan(key, state, frozen=frozen, flat=flat)
        plan.run()
        return plan.staged

    def plan(self, key: str, state: Any, *, frozen: Collection[tuple] = (), flat: bool = False) -> StagePlan:
        """Build the copy of ``state`` without copying tensor bytes yet (``StagePlan.run`` does).

        Training thread. Allocates missing buffers (keyed by the typed key path, so ``{0: a,
        "0": b}`` or ``{"a.b": a, "a": {"b": b}}`` get one buffer each), releases the buffers of
        paths the state no longer has, copies the non-tensors, and decides which frozen tensors
        are skipped. The same walk applies the type rules of ``plain``: a value that would not
        load raises ``UnsupportedStateError`` naming ``key`` and its path, before anything is
        written. ``flat``: the component is a safetensors file (a flat dict of dense tensors).
        With ``verify_incremental`` raises ``CheckpointError`` when a skipped tensor's bytes
        differ from its buffer's.
        """
        self.stats.bytes_copied = self.stats.bytes_skipped = 0
        plan = StagePlan(self)
        walk = _Walk(self, plan, key, frozen)
        with torch.no_grad():
            plan.staged = walk.flat(state) if flat else walk.visit(state, ())
        self._keep(key, walk.used)
        if any(c.source.is_cuda for c in plan.copies):
            plan.cuda_ready = torch.cuda.current_stream(next(c.source.device for c in plan.copies if c.source.is_cuda)).record_event()
        return plan

    def reserve(self, key: str, state: Any) -> None:
        """Allocate the buffers ``stage`` will need for a state like ``state``, without copying.

        Called on the training thread by ``CheckpointManager.prepare()`` so that the first save
        stalls no longer than later ones.
        """

        seen: set[tuple] = set()
        used: dict[tuple, torch.Tensor] = {}

        def visit(value: Any, path: tuple) -> None:
            if isinstance(value, torch.Tensor):
                ident = _identity(value)
                if _dense(value) and not (value.numel() and ident in seen):
                    seen.add(ident)
                    used[path] = self._buffer(key, path, value, touch=True)
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    visit(v, (*path, k))
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    visit(v, (*path, i))

        visit(state, ())
        self._keep(key, used)

    def _keep(self, key: str, used: dict[tuple, torch.Tensor]) -> None:
        """Keep only the buffers of ``key`` that the last walk used: paths that are gone free theirs."""
        old = self._buffers.get(key, {})
        self._buffers[key] = used
        if old.keys() != used.keys():
            for path in old.keys() - used.keys():
                self._filled.pop((key, path), None)

    def _unchanged(self, where: tuple[str, str], tensor: torch.Tensor, version: int) -> bool:
        """Whether the buffer at ``where`` holds ``tensor``'s bytes at its current version."""
        fill = self._filled.get(where)
        return fill is not None and fill.version == version and fill.layout == _layout(tensor) and fill.storage() is tensor.untyped_storage()

    def _buffer(self, key: str, path: tuple, tensor: torch.Tensor, touch: bool = False) -> torch.Tensor:
        """The buffer for ``(key, path)``, allocated on first use or when shape or dtype change.

        ``touch`` writes zeros so the kernel maps every page now rather than during a save.
        """
        buffer = self._buffers.get(key, {}).get(path)
        if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
            return buffer
        pin = self._pin and tensor.is_cuda
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        if touch:
            buffer.zero_()
        self._filled.pop((key, path), None)
        self.stats.allocations += 1
        self.stats.bytes_allocated += _nbytes(buffer)
        logger.debug("staging: new buffer %s.%s %s %s (pinned=%s)", key, plain.show(path), tuple(tensor.shape), tensor.dtype, pin)
        return buffer

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream


class _Walk:
    """One ``plan``'s walk over a state: copies the containers, plans the tensors, applies ``plain``'s rules.

    Exact plain leaves are returned as they are (immutable); only other leaves go through
    ``plain.plain_leaf``, so the rules cost nothing for the values state dicts are made of.
    """

    def __init__(self, pool: StagingPool, plan: StagePlan, key: str, frozen: Collection[tuple]) -> None:
        self.pool, self.plan, self.key, self.frozen = pool, plan, key, frozen
        self.memo: dict[tuple, torch.Tensor] = {}  # tensor identity -> its buffer (tied weights)
        self.used: dict[tuple, torch.Tensor] = {}  # typed key path -> buffer, for this state

    def visit(self, value: Any, path: tuple) -> Any:
        cls = type(value)
        if cls in _ATOMS:
            return value
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if cls is dict or cls is OrderedDict:
            return self.mapping(value, path, cls)
        if cls is list:
            return [self.visit(v, (*path, i)) for i, v in enumerate(value)]
        if cls is tuple:
            return tuple(self.visit(v, (*path, i)) for i, v in enumerate(value))
        return self.other(value, path)

    def flat(self, state: Any) -> dict:
        """A safetensors component: a flat ``{str: dense tensor}`` dict, checked entry by entry."""
        if not isinstance(state, Mapping):
            raise plain.refuse(self.key, (), f"is a {type(state).__name__}, not a dict of tensors",
                               "return a flat {name: tensor} dict, or use StateComponent(..., file_format='torch')")
        out = {}
        for name, value in state.items():
            plain.check_flat(self.key, name, value)
            out[name] = self.tensor(value, (name,))
        return out

    def mapping(self, value: Mapping, path: tuple, cls: type) -> Any:
        out = cls()
        for k, v in value.items():
            if type(k) not in plain.KEY_TYPES:
                k = plain.plain_key(k, self.key, path)
            out[k] = self.visit(v, (*path, k))
        if len(out) != len(value):
            raise plain.refuse(self.key, path, f"has keys that become equal as plain keys ({sorted(map(repr, value))[:6]})",
                               "give each entry a distinct str or int key")
        metadata = getattr(value, "_metadata", None) if cls is OrderedDict else None
        if metadata is not None:  # nn.Module versions, which load_state_dict reads
            out._metadata = self.visit(metadata, (*path, "_metadata"))  # type: ignore[attr-defined]
        return out

    def other(self, value: Any, path: tuple) -> Any:
        """Containers of other types become their plain kind; other leaves follow ``plain.plain_leaf``."""
        if isinstance(value, Mapping):
            return self.mapping(value, path, dict)
        if isinstance(value, list):
            return [self.visit(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.visit(v, (*path, i)) for i, v in enumerate(value))
        if isinstance(value, (set, frozenset)):
            return {self.visit(v, (*path, i)) for i, v in enumerate(value)}
        if type(value) is bytearray:
            return bytearray(value)
        return plain.plain_leaf(value, self.key, path)

    def tensor(self, tensor: torch.Tensor, path: tuple) -> torch.Tensor:
        tensor = tensor.detach()  # shares the version counter with the parameter
        if type(tensor) is not torch.Tensor or tensor.dtype not in plain.SAVEABLE_DTYPES or tensor.device.type == "meta":
            plain.check_tensor(tensor, self.key, path)
        if not _dense(tensor):  # sparse, quantized, nested: rare, copied fresh each save
            return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")
        ident = _identity(tensor)
        if tensor.numel() and ident in self.memo:
            return self.memo[ident]
        pool, key = self.pool, self.key
        buffer = self.used[path] = pool._buffer(key, path, tensor)
        if tensor.numel():
            self.memo[ident] = buffer
        version = _version(tensor)
        nbytes = _nbytes(buffer)
        if ident in self.frozen and version is not None and pool._unchanged((key, path), tensor, version):
            if pool._verify:
                _check_same(key, path, tensor, buffer)
            pool.stats.bytes_skipped += nbytes
            pool.stats.total_skipped += nbytes
            return buffer
        self.plan.copies.append(_Copy(tensor, buffer, (key, path), version))
        pool.stats.bytes_copied += nbytes
        pool.stats.total_copied += nbytes
        return buffer


_ATOMS = plain.ATOMS


def _dense(tensor: torch.Tensor) -> bool:
    """Whether a tensor is copied into a reused buffer (strided, not quantized, not nested)."""
    return tensor.layout is torch.strided and not tensor.is_quantized and not tensor.is_nested


class BackgroundSnapshot:
    """Overlap mode: a save's large copies run on a helper thread while forward/backward compute.

    Built by ``save(overlap=True)`` on the training thread, which copies the small tensors
    (BatchNorm statistics, step counters) at once. ``wait`` is called on the training thread
    before anything changes the state (the optimizer step): it blocks until the copies end and
    checks that no tensor's version counter moved meanwhile. ``verdict`` is called on the
    commit thread before any byte is written: it blocks until ``wait`` has run.
    """

    def __init__(self, plans: list[StagePlan], executor: concurrent.futures.Executor) -> None:
        self._plans = plans
        self._confirmed = threading.Event()
        self._error: str | None = None
        for plan in plans:
            plan.run("small")
        self._copied = executor.submit(self._copy_large)

    def _copy_large(self) -> None:
        for plan in self._plans:
            plan.run("large")

    def wait(self) -> float:
        """Block until the snapshot is complete; return the seconds spent blocked. Training thread."""
        started = time.perf_counter()
        try:
            try:
                self._copied.result()
            except Exception as exc:  # a failed copy fails the save, never the training step
                self._error = f"copy failed: {type(exc).__name__}: {exc}"
            blocked = time.perf_counter() - started
            torn = [path for plan in self._plans for path in plan.changed("large")]
            if torn and self._error is None:
                self._error = (
                    f"the state changed while overlap mode was copying it ({', '.join(torn[:3])}"
                    f"{', ...' if len(torn) > 3 else ''}): call wait_snapshot() before the optimizer step "
                    "or any other in-place change"
                )
            if self._error is not None:
                for plan in self._plans:
                    plan.forget()
            return blocked
        finally:
            self._confirmed.set()

    def verdict(self, timeout: float) -> str | None:
        """Commit thread: block until ``wait`` ran; return why the snapshot is unusable, or None."""
        if not self._confirmed.wait(timeout):
            self._copied.exception()  # never leave the copy running under a write
            for plan in self._plans:
                plan.forget()
            return (
                f"save(overlap=True) was never confirmed by wait_snapshot() within {timeout:g}s: "
                "call it before the optimizer step (the snapshot is not known to be point-in-time)"
            )
        return self._error


def frozen_identities(stateful: Any, optimizers: Iterable[Any] = ()) -> set[tuple]:
    """Identities of the tensors incremental staging may skip: ``stateful``'s frozen parameters.

    A parameter qualifies when ``requires_grad`` is False and no optimizer in ``optimizers``
    holds it (fused optimizers update parameters without bumping their version counter, so a
    parameter an optimizer may touch is always copied). Non-modules have none.
    """
    if not isinstance(stateful, torch.nn.Module):
        return set()
    held = {id(p) for opt in optimizers for group in getattr(opt, "param_groups", ()) for p in group.get("params", ())}
    return {_identity(p) for p in stateful.parameters() if not p.requires_grad and id(p) not in held}


def _identity(tensor: torch.Tensor) -> tuple:
    """Two names with the same identity are the same memory (tied weights): one buffer serves both."""
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _layout(tensor: torch.Tensor) -> tuple:
    return (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none (never skipped)."""
    if tensor.is_inference():
        return None
    try:
        return tensor._version
    except RuntimeError:
        return None


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _check_same(key: str, path: tuple, tensor: torch.Tensor, buffer: torch.Tensor) -> None:
    """``verify_incremental``: the skipped tensor's bytes must equal its buffer's."""
    source = tensor.to("cpu") if tensor.is_cuda else tensor
    same = torch.equal(source.contiguous().reshape(-1).view(torch.uint8), buffer.reshape(-1).view(torch.uint8)) if tensor.numel() else True
    if not same:
        raise CheckpointError(
            f"Incremental staging: component '{key}' tensor '{plain.show(path)}' changed without bumping its "
            "version counter (written through .data, NumPy, DLPack, raw storage or a C extension). "
            "Write frozen parameters only through in-place torch ops, or drop the component from incremental."
        )
