"""``DDPTrainer``: data parallel training with ``DistributedDataParallel`` under torchrun.

Model and optimizer are replicated: rank 0 writes them once, after every rank has checked that
its copy is the same (per-tensor hashes for the model, one hash for the optimizer), so a rank
that drifted stops training with ``Replication validation failed for component 'model'``.

Data, two ways (``DDPTrainingArguments.dispatch_batches``):

* ``True`` (default): rank 0 alone iterates the loader, whose batches are *global* batches of
  ``per_device_train_batch_size * world_size`` samples; it splits each along dim 0 and sends rank
  r its r-th chunk. The dataset position is GLOBAL (``dataset_state.pt``, rank 0's loader).
* ``False``: every rank iterates its own loader (by default a ``StatefulDataLoader`` over a
  ``DistributedSampler``, reseeded each epoch); the position is PER_RANK
  (``dataset_state_rank_N.pt``), so a resume needs the same world size.

Every collective here runs on the training thread.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .. import SharingPattern, ValidationLevel
from .args import TrainingArguments
from .base import BaseTrainer
from .data import batch_rows, build_dataloader, split_batch
from .positions import SizedPosition

logger = logging.getLogger(__name__)

_REPLICATED = {
    "model": ValidationLevel.TENSOR,
    "optimizer": ValidationLevel.QUICK,
    "scheduler": ValidationLevel.NONE,
    "trainer": ValidationLevel.NONE,
}


@dataclass(frozen=True, kw_only=True)
class DDPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus how data reaches the ranks."""

    dispatch_batches: bool = True  # rank 0 loads and sends each rank its slice; False: each rank loads its own
    ddp_find_unused_parameters: bool = False  # passed to DistributedDataParallel
    backend: str | None = None  # process group backend when the trainer initialises it; None: nccl on CUDA, else gloo

    def _problems(self) -> list[str]:
        out = super()._problems()
        for name in ("dispatch_batches", "ddp_find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        return out


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment, if not done yet."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError("torch.distributed is not initialised and RANK is not set: launch with torchrun --nproc_per_node=N")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))


class DistributedRanks:
    """Mixin for trainers of several processes: joins the default group, keeps rank and world size."""

    def _join(self, args: Any) -> None:
        """Training thread, in ``__init__`` before ``BaseTrainer.__init__``; collective when it initialises."""
        init_distributed(getattr(args, "backend", None) if args is not None and not isinstance(args, dict) else None)
        self._rank, self._world = dist.get_rank(), dist.get_world_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world


class DDPTrainer(DistributedRanks, BaseTrainer):
    """Data parallel ``Trainer``: one process per device, gradients all-reduced by DDP.

    Construct on every rank with the same arguments (the process group is initialised from the
    torchrun environment when needed). With ``dispatch_batches=True`` only rank 0's data is
    read; with ``False`` pass ``train_dataloader`` (each rank its shard) or ``train_dataset``
    (sharded by a ``DistributedSampler`` seeded with ``args.seed``).
    """

    args_class = DDPTrainingArguments
    args: DDPTrainingArguments

    def __init__(self, model: torch.nn.Module | None = None, args: Any = None, **kwargs: Any) -> None:
        self._join(args)
        super().__init__(model, args, **kwargs)

    def _prepare_model(self, model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        if model is None:
            raise ValueError("DDPTrainer needs model=")
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
            model = model.to(device)
            wrapped = DistributedDataParallel(model, device_ids=[device], find_unused_parameters=self.args.ddp_find_unused_parameters)
        else:
            wrapped = DistributedDataParallel(model, find_unused_parameters=self.args.ddp_find_unused_parameters)
        return wrapped.module, wrapped

    def _default_dataloader(self) -> Any:
        args, options = self.args, self._loader_options()
        if args.dispatch_batches and self.rank != 0 and self.train_dataset is None:
            return []  # only rank 0 reads data when dispatching
        if self.train_dataset is None:
            raise ValueError("DDPTrainer needs train_dataset= or train_dataloader= (on rank 0 at least with dispatch_batches=True)")
        if args.dispatch_batches:
            return build_dataloader(self.train_dataset, args.per_device_train_batch_size * self.world_size, seed=args.seed, **options)
        sampler = DistributedSampler(self.train_dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=args.seed)
        return build_dataloader(self.train_dataset, args.per_device_train_batch_size, seed=args.seed, sampler=sampler, **options)

    def _sharing(self, key: str) -> tuple[SharingPattern, ValidationLevel]:
        if key in _REPLICATED:
            return SharingPattern.REPLICATED, _REPLICATED[key]
        if key == "dataset":
            return (SharingPattern.GLOBAL if self.args.dispatch_batches else SharingPattern.PER_RANK), ValidationLevel.NONE
        return SharingPattern.PER_RANK, ValidationLevel.NONE

    def _component(self, key: str, stateful: Any, **kwargs: Any) -> Any:
        if key == "dataset":  # another world size: the epoch restarts rather than resuming at wrong samples
            stateful = SizedPosition(stateful, self.world_size, self.rank)
        return super()._component(key, stateful, **kwargs)

    def _fetch_batch(self) -> Any:
        if self.args.dispatch_batches:
            return self._dispatched_batch()
        batch = super()._fetch_batch()
        have = torch.tensor([0 if batch is None else 1], device=self.device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank ends the epoch together
        if batch is not None and not have.item():
            logger.warning("[rank %d step %d] another rank's data ran out first: ending epoch %d here", self.rank, self.state.global_step, self.state.epoch)
            return None
        return batch

    def _dispatched_batch(self) -> Any:
        """Rank 0 reads a global batch and scatters one chunk per rank; None (for all) at epoch end."""
        chunks: list[Any] = [None] * self.world_size
        if self.rank == 0:
            batch = super()._fetch_batch()
            while batch is not None and batch_rows(batch) < self.world_size:
                logger.warning("[rank 0 step %d] dropping a batch of %d samples: fewer than %d ranks", self.state.global_step, batch_rows(batch), self.world_size)
                batch = super()._fetch_batch()
            if batch is not None:
                chunks = split_batch(batch, self.world_size)
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, chunks if self.rank == 0 else None, src=0)
        return mine[0]

    def _steps_per_epoch(self) -> int | None:
        if self.args.dispatch_batches:
            return self._broadcast(super()._steps_per_epoch())
        return super()._steps_per_epoch()

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
