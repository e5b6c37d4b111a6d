"""Batches, epoch after epoch, in an order that a resume reproduces bitwise.

Each epoch's order is a function of ``(seed, epoch)``: at every epoch start the sampler's
generator (and the loader's) is reseeded with ``seed + epoch`` and ``set_epoch(epoch)`` is called
on samplers and datasets that have it (as ``DistributedSampler`` expects), before the epoch's
iterator is created. A mid-epoch resume restores the loader's own state (torchdata's
``StatefulDataLoader`` replays its sampler to the saved position), so the rest of that epoch and
every later epoch come out as in a run that never stopped. ``EpochIterator`` and ``reseed`` live in
``async_ckpt.dataloader_state`` (public: ``ResumableLoader``, for hand-written loops).

Everything here runs on the training thread.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset

from ..dataloader_state import EpochIterator, reseed  # noqa: F401 - the trainers' names for them

logger = logging.getLogger(__name__)


def build_dataloader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    sampler: Any = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> Any:
    """The default loader: a shuffling torchdata ``StatefulDataLoader`` with its own generator.

    ``sampler`` (e.g. a ``DistributedSampler``) replaces the shuffle; an ``IterableDataset`` is
    read in its own order.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    shuffle = sampler is None and not isinstance(dataset, IterableDataset)
    with warnings.catch_warnings():  # torchdata 0.11 calls a torch API deprecated in 2.13
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
            collate_fn=collate_fn, num_workers=num_workers, drop_last=drop_last,
        )


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` can save and restore its position (``state_dict``/``load_state_dict``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (containers rebuilt, other values kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_rows(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first tensor (else its length)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return batch_rows(value)
    return len(batch) if hasattr(batch, "__len__") else 1


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split every tensor of ``batch`` along dim 0 into ``parts`` contiguous chunks (rank r takes chunk r)."""
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, parts))
    if isinstance(batch, Mapping):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        columns = [split_batch(v, parts) for v in batch]
        return [type(batch)(column[i] for column in columns) for i in range(parts)]
    return [batch] * parts
