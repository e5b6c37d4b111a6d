"""The exception types of async_ckpt.

Every error a user can see is a ``CheckpointError``. Messages name what is needed to act on them:
the rank, the step, the component, the phase and the path, whichever apply.
"""

from __future__ import annotations

from pathlib import Path


def describe(
    message: str,
    *,
    rank: int | None = None,
    step: int | None = None,
    component: str | None = None,
    phase: str | None = None,
    path: str | Path | None = None,
) -> str:
    """Return ``message`` prefixed with the context fields that are set, e.g. ``[rank 1 step 40]``."""
    parts = []
    if rank is not None:
        parts.append(f"rank {rank}")
    if step is not None:
        parts.append(f"step {step}")
    if component is not None:
        parts.append(f"component '{component}'")
    if phase is not None:
        parts.append(f"phase {phase}")
    prefix = f"[{' '.join(parts)}] " if parts else ""
    suffix = f" (path: {path})" if path is not None else ""
    return f"{prefix}{message}{suffix}"


class CheckpointError(Exception):
    """Base class of every error raised by async_ckpt."""


class CheckpointConfigError(CheckpointError, ValueError):
    """A component list, argument or topology that cannot work; raised at construction."""


class CheckpointSaveError(CheckpointError):
    """A save did not commit. Every rank raises the same message for the same save."""


class CheckpointTimeoutError(CheckpointSaveError):
    """A save did not commit because a rank did not report (or rank 0 did not publish) in time."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint, or a file a required component needs, does not exist."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint exists but cannot be trusted: bad manifest, wrong size, wrong hash, bad file."""


class CheckpointFormatError(CheckpointCorruptError):
    """The manifest was written by a newer async_ckpt (``format_version`` too high)."""


class CheckpointLoadError(CheckpointError):
    """A checkpoint verified but a component could not be restored from it."""


class ReplicationValidationError(CheckpointSaveError):
    """Ranks disagree on a component saved as REPLICATED; raised on every rank."""


class CheckpointDirectoryError(CheckpointConfigError):
    """``output_dir`` cannot be created or written (read-only, no permission, a file in the path)."""


class CheckpointLockError(CheckpointError):
    """Another live job owns ``output_dir``; the message names it (host, pid, since when)."""


class CheckpointSpaceError(CheckpointSaveError):
    """A save refused before writing anything: the free space is clearly below the last checkpoint's size."""


class UnsupportedStateError(CheckpointSaveError):
    """A component's state holds a value its file format cannot give back; raised when it is saved.

    The message names the component and the key path and says what to return from
    ``state_dict()`` instead. The save does not commit (docs/format.md lists the rules).
    """
