"""Pipeline stages saved under their names in the full model, so checkpoints stay whole-model.

A stage built by slicing the full model (``model.layers[0:4]``) names its tensors relative to
itself (``0.weight``). ``FullNames`` wraps the stage for checkpointing: ``state_dict()`` uses the
full model's names (``layers.0.weight``), found by tensor identity, and ``load_state_dict`` maps
them back. Every stage's file then holds disjoint full names: ``async-ckpt export`` merges them
into one file that loads into the unsplit model. Called on the training thread.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def full_names(full_model: torch.nn.Module, stage: torch.nn.Module) -> dict[str, str]:
    """``{stage name: full model name}`` for every entry of the stage's state dict (pure).

    Tensors are matched by identity (the splitter shares modules, it does not copy them). A
    stage whose tensors are not found in the full model keeps its own names, with a warning.
    """
    by_id: dict[int, str] = {}
    for name, tensor in full_model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), name)
    stage_tensors = stage.state_dict(keep_vars=True)
    unmatched = [name for name, tensor in stage_tensors.items() if id(tensor) not in by_id]
    mapping = {name: by_id.get(id(tensor), name) for name, tensor in stage_tensors.items()}
    if unmatched or len(set(mapping.values())) != len(mapping):
        logger.warning("pipeline stage: tensors not found in the full model (%s); saving under stage names", unmatched[:5])
        return {name: name for name in stage_tensors}
    return mapping


class FullNames:
    """A stage module's state dict keyed by full-model names."""

    def __init__(self, stage: torch.nn.Module, names: dict[str, str]) -> None:
        self.stage = stage
        self.to_full = dict(names)
        self.to_stage = {full: local for local, full in names.items()}

    def state_dict(self) -> dict[str, Any]:
        return {self.to_full.get(k, k): v for k, v in self.stage.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        return self.stage.load_state_dict({self.to_stage.get(k, k): v for k, v in state.items()})
