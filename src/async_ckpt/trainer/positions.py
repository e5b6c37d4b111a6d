"""The data position of a multi-rank trainer, with the world size that counted it.

Used by ``DDPTrainer`` and ``FSDPTrainer`` for their ``dataset`` component. Training thread only.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class SizedPosition:
    """The data position with the world size that counted it.

    The loader's state counts batches of ``per_device_train_batch_size * world_size`` samples
    (dispatched) or of one rank's shard: on another world size it does not name the same
    samples. There the position is dropped with a warning and the current epoch restarts from
    its first batch (samples of that epoch are seen again), instead of resuming at a wrong one.
    Training thread only.
    """

    def __init__(self, inner: Any, world_size: int, rank: int) -> None:
        self.inner, self.world_size, self.rank = inner, world_size, rank

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "loader": self.inner.state_dict()}

    def rederive(self, saved: Any, rank: int, saved_world_size: int) -> Any:
        """Per-rank positions on another world size (loader's hook): any saved rank's state will
        do, since ``load_state_dict`` then sees the other world size and drops it."""
        return saved

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not (isinstance(state, dict) and set(state) == {"world_size", "loader"}):
            return self.inner.load_state_dict(state)  # written before the world size was recorded
        saved = state["world_size"]
        if saved != self.world_size:
            if self.rank == 0:
                logger.warning(
                    "data position saved on %s rank(s), this job has %d: the current epoch restarts "
                    "from its first batch",
                    saved,
                    self.world_size,
                )
            return
        self.inner.load_state_dict(state["loader"])
