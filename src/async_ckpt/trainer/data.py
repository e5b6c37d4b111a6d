"""Batches, epoch after epoch, in an order that a resume reproduces bitwise.

Each epoch's order is a function of ``(seed, epoch)``: at every epoch start the sampler's
generator (and the loader's) is reseeded with ``seed + epoch`` and ``set_epoch(epoch)`` is called
on samplers and datasets that have it (as ``DistributedSampler`` expects), before the epoch's
iterator is created. A mid-epoch resume restores the loader's own state (torchdata's
``StatefulDataLoader`` replays its sampler to the saved position), so the rest of that epoch and
every later epoch come out as in a run that never stopped.

Everything here runs on the training thread.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset, RandomSampler

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


class EpochIterator:
    """Iterates ``loader`` epoch after epoch; also the ``dataset`` component's Stateful.

    ``state_dict()`` is the loader's own state (``dataset_state.pt``). ``load_state_dict()``
    keeps the state until the next epoch opens, then hands it to the loader, after the reseed, so
    the loader replays the saved epoch's order to the saved position. A state taken after the
    epoch ran out is dropped: the next epoch starts fresh.
    """

    def __init__(self, loader: Any, seed: int) -> None:
        self.loader = loader
        self.seed = seed
        self._iter: Any = None
        self._pending: Any = None

    def state_dict(self) -> Any:
        return self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self._pending = state
        self._iter = None

    def next(self, epoch: int) -> Any:
        """The next batch of ``epoch``, or None when the epoch has run out (then call again for the next)."""
        if self._iter is None:
            self._iter = self._open(epoch)
        batch = next(self._iter, None)
        if batch is None:
            self._iter = None
        return batch

    def _open(self, epoch: int) -> Any:
        reseed(self.loader, self.seed, epoch)
        pending, self._pending = self._pending, None
        if pending is not None and not (isinstance(pending, Mapping) and pending.get("_iterator_finished")):
            self.loader.load_state_dict(pending)
        # Whatever the loader draws from the global generator while building the iterator
        # (a worker base seed, a sampler seed) depends on (seed, epoch) only, and the training
        # RNG stream (dropout) is left exactly where it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed + epoch)
            return iter(self.loader)


def reseed(loader: Any, seed: int, epoch: int) -> None:
    """Make ``epoch``'s order of ``loader`` a function of ``(seed, epoch)``; called at epoch start."""
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    seen: set[int] = set()
    for sampler in samplers:
        if sampler is None or id(sampler) in seen:
            continue
        seen.add(id(sampler))
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator()  # torch's RandomSampler would draw a fresh seed
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed + epoch)
    if isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.manual_seed(seed + epoch)
    dataset = getattr(loader, "dataset", None)
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch)


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
