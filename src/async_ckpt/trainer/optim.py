"""The default optimizer (AdamW) and learning-rate schedule (by name, ``schedulers.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .args import TrainingArguments
from .schedulers import build_scheduler


def default_optimizer(params: Iterable[torch.nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW with the arguments' learning rate and weight decay."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay)


def default_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int | None) -> Any:
    """The schedule ``args.lr_scheduler_type`` names, with HF's formulas (``schedulers.py``)."""
    return build_scheduler(optimizer, args, total_steps)
