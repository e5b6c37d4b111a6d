"""``PipelineTrainer``: pipeline parallel training with ``torch.distributed.pipelining``.

``model_splitter(model)`` returns one module per stage; rank r runs stage r as a
``PipelineStage`` under a GPipe or 1F1B schedule of ``n_microbatches`` microbatches. The loss is
computed on the last stage with ``loss_fn(output, labels)``.

Checkpoint: model and optimizer PER_RANK (``model_state_rank_N.safetensors``, keyed by the
names in the full model, so ``async-ckpt export`` merges the stages into one loadable file;
``optimizer_state_rank_N.pt``), scheduler and trainer progress REPLICATED (rank 0 writes),
dataset GLOBAL (rank 0 reads the data and broadcasts each batch), RNG PER_RANK. A checkpoint
resumes only with the same world size and the same split: another world size is refused by the
checkpoint manager (``CheckpointLoadError``).

Every collective and point-to-point transfer here runs on the training thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.utils.data import DistributedSampler

from .. import SharingPattern, StateComponent, ValidationLevel
from .args import TrainingArguments
from .base import BaseTrainer
from .data import batch_rows, build_dataloader, to_device
from .ddp import DistributedRanks
from .stage_names import FullNames, full_names
from .pipeline_mesh import PipelineTopology

logger = logging.getLogger(__name__)

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_SHARING = {
    "model": SharingPattern.PER_RANK,
    "optimizer": SharingPattern.PER_RANK,
    "scheduler": SharingPattern.REPLICATED,
    "trainer": SharingPattern.REPLICATED,
    "dataset": SharingPattern.GLOBAL,
}
_ONCE_PER_STAGE = ("model", "optimizer")  # with dp_degree > 1: saved by one replica per stage


@dataclass(frozen=True, kw_only=True)
class PipelineTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the pipeline schedule."""

    n_microbatches: int = 4  # microbatches per batch; the batch size must be a multiple of it
    pipeline_schedule: str = "gpipe"  # "gpipe" | "1f1b"
    backend: str | None = None  # process group backend when the trainer initialises it; None: nccl on CUDA, else gloo
    dp_degree: int = 1  # data-parallel replicas of the pipeline (world size = dp_degree x stages)

    def _problems(self) -> list[str]:
        out = super()._problems()
        if not isinstance(self.n_microbatches, int) or self.n_microbatches < 1:
            out.append(f"n_microbatches must be a positive integer, got {self.n_microbatches!r}")
        elif isinstance(self.per_device_train_batch_size, int) and self.per_device_train_batch_size % self.n_microbatches:
            out.append(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"n_microbatches ({self.n_microbatches})"
            )
        if not isinstance(self.dp_degree, int) or self.dp_degree < 1:
            out.append(f"dp_degree must be a positive integer, got {self.dp_degree!r}")
        if self.pipeline_schedule not in _SCHEDULES:
            out.append(f"pipeline_schedule must be one of {', '.join(map(repr, _SCHEDULES))}; got {self.pipeline_schedule!r}")
        return out


def default_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (a language model's logits)."""
    return torch.nn.functional.cross_entropy(output.reshape(-1, output.size(-1)), labels.reshape(-1))


class PipelineTrainer(DistributedRanks, BaseTrainer):
    """Pipeline parallel trainer: one stage per rank, batches broadcast from rank 0.

    Construct on every rank with the same arguments. Pass ``model`` (built identically on every
    rank) or ``model_init`` (called after seeding with ``args.seed``). Batches are
    ``(inputs, labels)`` pairs or dicts with ``labels`` and one input (``input_ids`` if present).
    """

    args_class = PipelineTrainingArguments
    args: PipelineTrainingArguments

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: Any = None,
        *,
        model_splitter: Callable[[torch.nn.Module], list[torch.nn.Module]],
        model_init: Callable[[], torch.nn.Module] | None = None,
        train_dataset: Any = None,
        train_dataloader: Any = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._join(args)
        self._splitter, self._model_init = model_splitter, model_init
        self.loss_fn = loss_fn or default_loss
        super().__init__(model, args, train_dataset=train_dataset, train_dataloader=train_dataloader, data_collator=data_collator)

    def _prepare_model(self, model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        if model is None:
            if self._model_init is None:
                raise ValueError("PipelineTrainer needs model= or model_init=")
            torch.manual_seed(self.args.seed)
            model = self._model_init()
        device = torch.device("cpu")
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        self.topology = PipelineTopology.build(self.args.dp_degree, self.rank, self.world_size, device.type)
        parts = list(self._splitter(model))
        if len(parts) != self.topology.stages:
            raise ValueError(
                f"model_splitter returned {len(parts)} stages but {self.world_size} ranks with dp_degree="
                f"{self.args.dp_degree} run {self.topology.stages}: return one stage per rank of a pipeline"
            )
        stage_module = parts[self.topology.stage].to(device)
        self._full_names = full_names(model, stage_module)
        self.stage = PipelineStage(stage_module, self.topology.stage, self.topology.stages, device, group=self.topology.pp_group)
        schedule = _SCHEDULES[self.args.pipeline_schedule]
        self.schedule = schedule(self.stage, n_microbatches=self.args.n_microbatches, loss_fn=self.loss_fn)
        return stage_module, stage_module

    def _default_dataloader(self) -> Any:
        topo = self.topology
        if topo.stage != 0:
            return []  # the first stage of each pipeline reads its replica's data
        if topo.replicas == 1:
            return super()._default_dataloader()
        if self.train_dataset is None:
            raise ValueError("PipelineTrainer needs train_dataset= or train_dataloader=")
        sampler = DistributedSampler(self.train_dataset, num_replicas=topo.replicas, rank=topo.replica, shuffle=True, seed=self.args.seed)
        return build_dataloader(self.train_dataset, self.args.per_device_train_batch_size, seed=self.args.seed, sampler=sampler, **self._loader_options())

    def _sharing(self, key: str) -> tuple[SharingPattern, ValidationLevel]:
        return _SHARING.get(key, SharingPattern.PER_RANK), ValidationLevel.NONE

    def _mesh(self) -> Any:
        return self.topology.mesh

    def _component(self, key: str, stateful: Any, **kwargs: Any) -> StateComponent:
        if key == "model":  # saved under full-model names, so the stages' files merge into one model
            stateful = FullNames(stateful, self._full_names)
        if self.topology.replicas > 1 and key in _ONCE_PER_STAGE:  # one copy per stage, shared along "dp"
            return StateComponent(key, stateful, sharing_pattern=SharingPattern.PER_GROUP, group="dp", **kwargs)
        if self.topology.replicas > 1 and key == "dataset":  # one position per replica (its "pp" group)
            return StateComponent(key, stateful, sharing_pattern=SharingPattern.PER_GROUP, group="pp", **kwargs)
        return super()._component(key, stateful, **kwargs)

    def _fetch_batch(self) -> Any:
        """Each pipeline's first stage reads the next batch and broadcasts it to its stages; None at epoch end."""
        topo = self.topology
        box: list[Any] = [None]
        if topo.stage == 0:
            batch = super()._fetch_batch()
            while batch is not None and batch_rows(batch) < self.args.n_microbatches:
                logger.warning("[rank %d step %d] dropping a batch of %d samples: fewer than n_microbatches", self.rank, self.state.global_step, batch_rows(batch))
                batch = super()._fetch_batch()
            box[0] = batch
        dist.broadcast_object_list(box, src=topo.first, group=topo.pp_group)
        ended = torch.tensor(1 if box[0] is None else 0)
        if topo.replicas > 1:  # every replica ends the epoch together (shards may differ by a batch)
            dist.all_reduce(ended, op=dist.ReduceOp.MAX)
        return None if ended.item() else box[0]

    def _global_rows(self, batch: Any) -> int:
        return batch_rows(batch)

    def _steps_per_epoch(self) -> int | None:
        box = [super()._steps_per_epoch() if self.topology.stage == 0 else None]
        dist.broadcast_object_list(box, src=self.topology.first, group=self.topology.pp_group)
        return box[0]

    def training_step(self, batch: Any) -> torch.Tensor:
        """One batch through the pipeline, then this stage's optimizer step; returns the batch's mean loss on every rank."""
        inputs, labels = (to_device(t, self.device) for t in split_inputs(batch))
        losses: list[torch.Tensor] = []
        first, last = self.stage.is_first, self.stage.is_last
        args = (inputs,) if first else ()
        kwargs = {"target": labels, "losses": losses} if last else {}
        self.schedule.step(*args, **kwargs)
        loss = torch.stack([l.detach().float() for l in losses]).mean() if last else torch.zeros((), device=self.device)
        topo = self.topology
        dist.broadcast(loss, src=topo.last, group=topo.pp_group)
        if topo.replicas > 1:  # average gradients (and the logged loss) over the replicas of this stage
            for param in self.model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=topo.dp_group)
                    param.grad.div_(topo.replicas)
            dist.all_reduce(loss, group=topo.dp_group)
            loss.div_(topo.replicas)
        self._optimizer_step()
        return loss

    def _clip_gradients(self, max_norm: float) -> None:
        """Clip by the norm over every stage's gradients (one all-reduce)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        squares = torch.zeros((), device=self.device)
        for grad in grads:
            squares += grad.detach().float().pow(2).sum()
        dist.all_reduce(squares, group=self.topology.pp_group)  # replicas hold the same averaged gradients
        scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))


def split_inputs(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a batch: a pair, or a dict with ``labels`` and one input."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        others = [k for k in batch if k != "labels"]
        key = "input_ids" if "input_ids" in batch else others[0] if len(others) == 1 else None
        if key is not None:
            return batch[key], batch["labels"]
    raise TypeError(
        "PipelineTrainer batches must be (inputs, labels) pairs or dicts with 'labels' and one input "
        f"('input_ids' if several); got {type(batch).__name__}"
        + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
    )
