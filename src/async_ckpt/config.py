"""Checks on ``CheckpointManager``'s arguments, and the small pieces of set-up built from them.

Called on the training thread at manager construction; ``lower_priority`` is the initializer
of the background threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .components import StateComponent
from .errors import CheckpointConfigError

logger = logging.getLogger(__name__)


def default_io_threads() -> int:
    """I/O threads per rank when none are asked for: one core left to training, at most 4.

    On a machine with few cores, writer threads that outnumber the free cores take the core the
    training thread needs (docs/performance.md, "Parallel per-file writes"). Files are written
    one per thread, so more than 4 rarely helps a rank.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(4, max(1, cores - 1))


def check_args(num_io_threads: int, compression: str | None, level: int, limit: int | None, timeout_s: float, on_busy: str) -> None:
    if not isinstance(num_io_threads, int) or num_io_threads < 1:
        raise CheckpointConfigError(f"num_io_threads must be a positive integer, got {num_io_threads!r}")
    if compression not in (None, "zstd"):
        raise CheckpointConfigError(f"compression must be None or 'zstd', got {compression!r}")
    if compression == "zstd" and not (-7 <= level <= 22):
        raise CheckpointConfigError(f"compression_level for zstd must be in -7..22, got {level}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise CheckpointConfigError(f"save_total_limit must be None or at least 1, got {limit!r}")
    if not timeout_s > 0:
        raise CheckpointConfigError(f"timeout_s must be positive, got {timeout_s!r}")
    if on_busy not in ("block", "skip"):
        raise CheckpointConfigError(f"on_busy must be 'block' or 'skip', got {on_busy!r}")


def check_lock_timeout(lock_timeout_s: float) -> None:
    if isinstance(lock_timeout_s, bool) or not isinstance(lock_timeout_s, (int, float)) or lock_timeout_s < 0:
        raise CheckpointConfigError(f"lock_timeout_s must be a number of seconds >= 0 (0: do not wait for another job), got {lock_timeout_s!r}")


def check_incremental(components: Sequence[StateComponent], keys: Sequence[str]) -> frozenset[str]:
    """The keys of the components that stage incrementally; refuses unknown keys and non-modules."""
    if isinstance(keys, str):
        raise CheckpointConfigError(f"incremental takes a list of component keys, got the string {keys!r}: use incremental=[{keys!r}]")
    by_key = {c.key: c for c in components}
    for key in keys:
        if key not in by_key:
            raise CheckpointConfigError(f"incremental names component {key!r}, which is not one of {sorted(by_key)}")
        if not isinstance(by_key[key].stateful, torch.nn.Module):
            raise CheckpointConfigError(
                f"incremental component {key!r} is a {type(by_key[key].stateful).__name__}, not a torch.nn.Module: "
                "only a module's frozen parameters can be left in place"
            )
    return frozenset(keys)


def describe_component(component: StateComponent) -> dict[str, Any]:
    return {
        "key": component.key,
        "sharing_pattern": component.sharing_pattern.value,
        "required": component.required,
        "file_format": component.file_format.value,  # type: ignore[union-attr]
        "group": component.group,
        "metadata": component.metadata,
    }


def lower_priority(nice: int) -> None:
    """Thread initializer: give this background thread (only it, on Linux) a lower CPU priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (AttributeError, OSError) as exc:  # not on this platform: run at normal priority
        logger.debug("io_nice not applied: %s", exc)
