"""async_ckpt: asynchronous, crash-safe checkpointing for PyTorch training.

Quick start::

    from async_ckpt import CheckpointManager, StateComponent, SharingPattern, rng_component
    mgr = CheckpointManager("runs/m", [StateComponent("model", model, required=True),
                                       StateComponent("optimizer", optimizer), rng_component()])
    mgr.load()                 # newest committed checkpoint that verifies, if any
    handle = mgr.save(step)    # returns once the snapshot is taken
    mgr.close()                # drains in-flight saves
"""

from .components import FileFormat, SharingPattern, StateComponent, ValidationLevel
from .errors import (
    CheckpointConfigError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLoadError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointTimeoutError,
    CheckpointDirectoryError,
    CheckpointLockError,
    CheckpointSpaceError,
    ReplicationValidationError,
)
from .handle import SaveHandle
from .loading import LoadResult
from .manager import CheckpointManager
from .mesh import LocalShards
from .rng import RNGState, rng_component
from .staging import StagingPool

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfigError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLoadError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointTimeoutError",
    "CheckpointDirectoryError",
    "CheckpointLockError",
    "CheckpointSpaceError",
    "FileFormat",
    "LoadResult",
    "LocalShards",
    "RNGState",
    "ReplicationValidationError",
    "SaveHandle",
    "SharingPattern",
    "StagingPool",
    "StateComponent",
    "ValidationLevel",
    "rng_component",
]
