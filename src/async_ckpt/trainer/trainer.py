"""``Trainer``: one process, one device."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .base import BaseTrainer


class Trainer(BaseTrainer):
    """Trains on one device in one process; every component is GLOBAL (written once).

    Files of ``checkpoint-N/``: ``model.safetensors``, ``optimizer_state.pt``,
    ``scheduler_state.pt``, ``trainer_state.pt``, ``dataset_state.pt``, ``rng_state.pt`` and
    ``checkpoint_manifest.json``.
    """

    def _prepare_model(self, model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"Trainer runs in one process, but torch.distributed has {dist.get_world_size()} ranks: "
                "use DDPTrainer (data parallel) or PipelineTrainer (pipeline parallel)."
            )
        return super()._prepare_model(model)
