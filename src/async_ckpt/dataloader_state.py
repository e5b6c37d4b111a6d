"""A data loader as a checkpoint component that resumes bitwise, epoch after epoch.

Each epoch's order is a function of ``(seed, epoch)``: at every epoch start the sampler's
generator (and the loader's) is reseeded with ``seed + epoch`` and ``set_epoch(epoch)`` is called
on samplers and datasets that have it (as ``DistributedSampler`` expects), before the epoch's
iterator is created, with the global RNG forked so that creating it (a worker base seed) draws
nothing from the training stream. A mid-epoch resume restores the loader's own state (torchdata's
``StatefulDataLoader`` replays its sampler to the saved position), so the rest of that epoch and
every later epoch come out as in a run that never stopped.

``ResumableLoader`` is the public face, for a hand-written loop (docs/user-guide.md, "Resume a
plain loop bitwise"); ``EpochIterator`` is what the trainers use. Everything here runs on the
training thread; ``state_dict()`` never starts an iterator (so a save, or the backup a load takes,
changes nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import RandomSampler

FINISHED = "_iterator_finished"  # torchdata's key: the saved epoch had run out


class EpochIterator:
    """Iterates ``loader`` epoch after epoch; also the Stateful of the loader's position.

    ``state_dict()`` is the loader's own state. ``load_state_dict()`` keeps the state until the
    next epoch opens, then hands it to the loader, after the reseed, so the loader replays the
    saved epoch's order to the saved position. A state taken after the epoch ran out is dropped:
    the next epoch starts fresh.
    """

    def __init__(self, loader: Any, seed: int) -> None:
        self.loader = loader
        self.seed = seed
        self._iter: Any = None
        self._pending: Any = None

    def state_dict(self) -> Any:
        """The position: the state loaded and not yet used, else the loader's (``{}`` before its first epoch)."""
        if self._pending is not None:
            return self._pending
        if getattr(self.loader, "_iterator", False) is None:  # a StatefulDataLoader with no iterator:
            return getattr(self.loader, "next_iter_state", None) or {}  # its state_dict() would start one
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
        if pending is not None and not finished(pending):
            self.loader.load_state_dict(pending)
        # Whatever the loader draws from the global generator while building the iterator
        # (a worker base seed, a sampler seed) depends on (seed, epoch) only, and the training
        # RNG stream (dropout) is left exactly where it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed + epoch)
            return iter(self.loader)


class ResumableLoader:
    """A shuffling loader that resumes bitwise in a plain loop: save it as a component.

    ``loader``: a torchdata ``StatefulDataLoader`` (any loader with ``state_dict`` /
    ``load_state_dict`` resumes mid-epoch; others restart the epoch). ``seed``: the data order's
    seed; epoch ``e`` is shuffled from ``seed + e``. Use::

        data = ResumableLoader(StatefulDataLoader(dataset, batch_size=8, shuffle=True), seed=0)
        components = [..., StateComponent("dataset", data), rng_component()]
        manager.load()
        for epoch in range(data.epoch, num_epochs):
            for batch in data.iterate(epoch):
                ...

    ``epoch``: the epoch to go on with after a load (the saved one, or the next when the saved
    one had run out); 0 on a fresh start. Training thread only.
    """

    def __init__(self, loader: Any, seed: int) -> None:
        self._epochs = EpochIterator(loader, seed)
        self.epoch = 0

    @property
    def loader(self) -> Any:
        return self._epochs.loader

    def iterate(self, epoch: int) -> Iterator[Any]:
        """The batches of ``epoch``, from the saved position when it is the epoch a load restored."""
        self.epoch = epoch
        while True:
            batch = self._epochs.next(epoch)
            if batch is None:
                return
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self._epochs.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not isinstance(state.get("epoch"), int) or "loader" not in state:
            raise ValueError(f"not a ResumableLoader state (expected 'epoch' and 'loader', got {type(state).__name__})")
        self.epoch = state["epoch"] + 1 if finished(state["loader"]) else state["epoch"]
        self._epochs.load_state_dict(state["loader"])


def finished(state: Any) -> bool:
    """Whether a loader state was taken after its epoch ran out."""
    return isinstance(state, Mapping) and bool(state.get(FINISHED))


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
