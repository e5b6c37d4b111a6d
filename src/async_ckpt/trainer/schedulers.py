"""Learning-rate schedules by name, with the Hugging Face formulas (``transformers.get_scheduler``).

Each schedule is a ``torch.optim.lr_scheduler.LambdaLR`` over a plain factor function of the
optimizer step, so ``state_dict()`` stores only step counters and a resume takes the schedule
from the current arguments (a longer ``max_steps`` stretches the decay). Built once, on the
training thread, when the trainer is constructed.

=========================  =============================================================
``constant``               factor 1 (warmup ignored, as in HF)
``constant_with_warmup``   ``step / warmup`` during warmup, then 1
``linear``                 warmup, then linear decay to 0 at the last step
``cosine``                 warmup, then half a cosine wave to 0 (``num_cycles=0.5``)
``cosine_with_restarts``   warmup, then ``num_cycles`` (default 1) cosine waves with hard restarts
=========================  =============================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

SCHEDULER_TYPES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
NEEDS_TOTAL = ("linear", "cosine", "cosine_with_restarts")


def warmup_steps(warmup: int, ratio: float, total: int | None) -> int:
    """HF's ``get_warmup_steps``: ``warmup`` if > 0, else ``ceil(total * ratio)``."""
    if warmup > 0 or not ratio:
        return warmup
    if total is None:
        raise ValueError("warmup_ratio needs the number of training steps, but the dataloader has no length: set max_steps or warmup_steps")
    return math.ceil(total * ratio)


def schedule_factor(name: str, warmup: int, total: int | None, num_cycles: float | None = None) -> Callable[[int], float]:
    """The LR factor of optimizer step ``step`` (0-based, as ``LambdaLR`` counts) for schedule ``name``."""
    if name == "constant":
        return lambda step: 1.0

    def warm(step: int) -> float:
        return step / max(1, warmup)

    if name == "constant_with_warmup":
        return lambda step: warm(step) if step < warmup else 1.0
    if total is None:
        raise ValueError(
            f"lr_scheduler_type={name!r} needs the number of training steps, but the dataloader has no length: "
            "set max_steps, or lr_scheduler_type='constant'."
        )

    def progress(step: int) -> float:
        return (step - warmup) / max(1, total - warmup)

    if name == "linear":
        return lambda step: warm(step) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    if name == "cosine":
        cycles = 0.5 if num_cycles is None else num_cycles
        return lambda step: warm(step) if step < warmup else max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress(step))))
    if name == "cosine_with_restarts":
        cycles = 1 if num_cycles is None else num_cycles

        def restarts(step: int) -> float:
            if step < warmup:
                return warm(step)
            p = progress(step)
            return 0.0 if p >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * p) % 1.0))))

        return restarts
    raise ValueError(f"lr_scheduler_type must be one of {', '.join(map(repr, SCHEDULER_TYPES))}; got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, args: Any, total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``args.lr_scheduler_type``, ``warmup_steps`` / ``warmup_ratio`` and ``lr_scheduler_kwargs``."""
    kwargs = dict(getattr(args, "lr_scheduler_kwargs", None) or {})
    warmup = warmup_steps(args.warmup_steps, getattr(args, "warmup_ratio", 0.0), total_steps)
    factor = schedule_factor(args.lr_scheduler_type, warmup, total_steps, kwargs.get("num_cycles"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
