"""``FSDPTrainer``: fully sharded data parallel training with FSDP2 (``fully_shard``) under torchrun.

The model is sharded over a 1-D mesh of every rank: ``fully_shard`` on each block chosen by
``shard_policy`` (overridable; by default each direct child that holds parameters), then on the
root. Parameters and AdamW moments are DTensors, so the model and the optimizer are SHARDED
components: each rank stages and writes only its local shards (no all-gather on the save path),
and the optimizer is saved by parameter name (``OptimizerState``), so a checkpoint loads on
another world size. Scheduler and trainer progress are written once (REPLICATED), RNG per rank
(re-derived with a warning on another world size). Data as in ``DDPTrainer``: with
``dispatch_batches=True`` (default) rank 0 reads global batches and scatters them.

Every collective here runs on the training thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .. import SharingPattern, ValidationLevel
from ..optim_state import OptimizerState
from .ddp import DDPTrainer, DDPTrainingArguments

_MIXED = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class FSDPTrainingArguments(DDPTrainingArguments):
    """``DDPTrainingArguments`` plus how FSDP2 shards the model."""

    reshard_after_forward: bool = True  # free the gathered parameters after forward (re-gathered in backward)
    mixed_precision: str | None = None  # "bfloat16" or "float16": compute dtype of parameters (fully_shard mp_policy)

    def _problems(self) -> list[str]:
        out = super()._problems()
        if not isinstance(self.reshard_after_forward, bool):
            out.append(f"reshard_after_forward must be True or False, got {self.reshard_after_forward!r}")
        if self.mixed_precision not in _MIXED:
            out.append(
                f"mixed_precision must be None, 'bfloat16', 'float16' or 'float32', got {self.mixed_precision!r}"
            )
        return out


class FSDPTrainer(DDPTrainer):
    """Data parallel ``Trainer`` whose model and optimizer state are sharded by FSDP2.

    Construct on every rank with the same arguments. Override ``shard_policy`` to choose the
    blocks that get their own ``fully_shard`` (e.g. the transformer layers).
    """

    args_class = FSDPTrainingArguments
    args: FSDPTrainingArguments

    def shard_policy(self, model: torch.nn.Module) -> Iterable[torch.nn.Module]:
        """The blocks sharded one by one before the root; default: direct children with parameters."""
        return [child for child in model.children() if any(True for _ in child.parameters())]

    def _prepare_model(self, model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Training thread, in ``__init__``: build the mesh and shard (collective over every rank)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if model is None:
            raise ValueError("FSDPTrainer needs model=")
        device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
        if device == "cuda":
            model = model.to(torch.cuda.current_device())
        self.fsdp_mesh = init_device_mesh(device, (self.world_size,), mesh_dim_names=("fsdp",))
        options: dict[str, Any] = {"mesh": self.fsdp_mesh, "reshard_after_forward": self.args.reshard_after_forward}
        if self.args.mixed_precision is not None:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=_MIXED[self.args.mixed_precision])
        for block in list(self.shard_policy(model)):
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model, model

    def _sharing(self, key: str) -> tuple[SharingPattern, ValidationLevel]:
        if key in ("model", "optimizer"):
            return SharingPattern.SHARDED, ValidationLevel.NONE
        return super()._sharing(key)

    def _component(self, key: str, stateful: Any, **kwargs: Any) -> Any:
        if key == "optimizer":
            stateful = OptimizerState(self.model, stateful)  # keyed by parameter name: reshards
        return super()._component(key, stateful, **kwargs)
