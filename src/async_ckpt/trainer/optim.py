"""The default optimizer (AdamW) and learning-rate schedules (constant, linear)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

from .args import TrainingArguments


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup over ``warmup`` steps, then linear decay to 0 at ``total`` steps.

    A plain function, so ``LambdaLR.state_dict()`` stores only the step counters: a resume takes
    the schedule from the current arguments (a longer ``max_steps`` stretches the decay).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def constant_schedule(warmup: int) -> Callable[[int], float]:
    """LR factor 1 after a linear warmup of ``warmup`` steps."""

    def factor(step: int) -> float:
        return (step + 1) / (warmup + 1) if step < warmup else 1.0

    return factor


def default_optimizer(params: Iterable[torch.nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW with the arguments' learning rate and weight decay."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay)


def default_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int | None) -> Any:
    """``LambdaLR`` over ``args.lr_scheduler_type``; "linear" needs the total number of steps."""
    if args.lr_scheduler_type == "constant":
        schedule = constant_schedule(args.warmup_steps)
    elif total_steps is None:
        raise ValueError(
            "lr_scheduler_type='linear' needs the number of training steps, but the dataloader "
            "has no length: set max_steps, or lr_scheduler_type='constant'."
        )
    else:
        schedule = linear_schedule(args.warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
