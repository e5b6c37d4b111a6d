"""Point-in-time copies of state into host buffers that are allocated once and reused.

``StagingPool.stage`` is called on the training thread inside ``save()``: it copies every tensor
of a state dict into a buffer kept from the previous save (same component, path, shape and
dtype), deep-copies everything else, and returns the copy. On CUDA the buffers are pinned and the
copies are issued non-blocking on a side stream, synchronised before ``stage`` returns, so the
snapshot is complete when ``save()`` returns. The background threads read the returned copy
while the training thread goes on; the pool must not be staged into again until they are done
(the manager guarantees it: one save holds the buffers at a time).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    """Counters that tests and benchmarks read: allocations must stop after the first save."""

    allocations: int = 0  # buffers created since the pool was built
    bytes_allocated: int = 0  # their total size
    bytes_copied: int = 0  # bytes copied into buffers by the last stage() call


class StagingPool:
    """Reusable host buffers, keyed by (component, path in the state dict, shape, dtype)."""

    def __init__(self, pin_memory: bool | None = None) -> None:
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._stream: Any = None
        self.stats = PoolStats()

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        return sum(buf.numel() * buf.element_size() for buf in self._buffers.values())

    def stage(self, key: str, state: Any) -> Any:
        """Return a point-in-time copy of ``state`` whose tensors live in this pool's buffers.

        Called on the training thread. Blocks until every copy (including device-to-host copies
        on CUDA) has finished. Tensors that share memory (tied weights) share one buffer in the
        copy, so ties survive.
        """
        self.stats.bytes_copied = 0
        memo: dict[tuple, torch.Tensor] = {}
        cuda_used = False

        def visit(value: Any, path: str) -> Any:
            nonlocal cuda_used
            if isinstance(value, torch.Tensor):
                if value.is_cuda:
                    cuda_used = True
                return self._copy_tensor(key, path, value, memo)
            if isinstance(value, Mapping):
                items = [(k, visit(v, f"{path}.{k}")) for k, v in value.items()]
                return type(value)(items) if type(value) in (dict, OrderedDict) else dict(items)
            if isinstance(value, list):
                return [visit(v, f"{path}.{i}") for i, v in enumerate(value)]
            if isinstance(value, tuple) and not hasattr(value, "_fields"):
                return tuple(visit(v, f"{path}.{i}") for i, v in enumerate(value))
            return copy.deepcopy(value)

        with torch.no_grad():
            staged = visit(state, "")
        if cuda_used and self._stream is not None:
            self._stream.synchronize()
        return staged

    def reserve(self, key: str, state: Any) -> None:
        """Allocate the buffers ``stage`` will need for a state like ``state``, without copying.

        Called on the training thread by ``CheckpointManager.prepare()`` so that the first save
        stalls no longer than later ones.
        """

        seen: set[tuple] = set()

        def visit(value: Any, path: str) -> None:
            if isinstance(value, torch.Tensor):
                ident = _identity(value)
                if value.layout is torch.strided and not (value.numel() and ident in seen):
                    seen.add(ident)
                    self._buffer(key, path, value, touch=True)
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    visit(v, f"{path}.{k}")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    visit(v, f"{path}.{i}")

        visit(state, "")

    def _copy_tensor(self, key: str, path: str, tensor: torch.Tensor, memo: dict[tuple, torch.Tensor]) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.layout is not torch.strided:  # sparse and friends: rare, copied fresh each save
            return tensor.to("cpu", copy=True)
        ident = _identity(tensor)
        if tensor.numel() and ident in memo:
            return memo[ident]
        buffer = self._buffer(key, path, tensor)
        if tensor.is_cuda:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                buffer.copy_(tensor, non_blocking=True)
        else:
            buffer.copy_(tensor)
        self.stats.bytes_copied += buffer.numel() * buffer.element_size()
        if tensor.numel():
            memo[ident] = buffer
        return buffer

    def _buffer(self, key: str, path: str, tensor: torch.Tensor, touch: bool = False) -> torch.Tensor:
        """The buffer for ``(key, path)``, allocated on first use or when shape or dtype change.

        ``touch`` writes zeros so the kernel maps every page now rather than during a save.
        """
        buffer = self._buffers.get((key, path))
        if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
            return buffer
        pin = self._pin and tensor.is_cuda
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        if touch:
            buffer.zero_()
        self._buffers[(key, path)] = buffer
        self.stats.allocations += 1
        self.stats.bytes_allocated += buffer.numel() * buffer.element_size()
        logger.debug("staging: new buffer %s%s %s %s (pinned=%s)", key, path, tuple(tensor.shape), tensor.dtype, pin)
        return buffer

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream



def _identity(tensor: torch.Tensor) -> tuple:
    """Two names with the same identity are the same memory (tied weights): one buffer serves both."""
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
