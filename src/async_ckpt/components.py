"""What a checkpoint holds: state components and how they are shared between ranks."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import CheckpointConfigError


class SharingPattern(str, enum.Enum):
    """Who writes a component's file and who reads it back (DESIGN.md section 5)."""

    GLOBAL = "global"  # written by global rank 0, read by every rank
    PER_RANK = "per_rank"  # one file per rank, each rank reads its own
    REPLICATED = "replicated"  # like GLOBAL, after optional cross-rank validation
    PER_GROUP = "per_group"  # one file per instance of a named process group
    PER_NODE = "per_node"  # one file per node, written by its local rank 0
    SHARDED = "sharded"  # DTensor state: every rank writes its own chunks, any mesh reads them


class ValidationLevel(str, enum.Enum):
    """How hard REPLICATED components are compared across ranks before a save."""

    NONE = "none"  # no check
    QUICK = "quick"  # one hash over every tensor's bytes and every other value
    TENSOR = "tensor"  # one hash per tensor, so the message names the tensors that differ
    FULL = "full"  # all bytes gathered and compared to rank 0's (world_size x memory)


class FileFormat(str, enum.Enum):
    """How a component's state dict is written."""

    SAFETENSORS = "safetensors"  # flat {name: tensor}; loads with stock safetensors
    TORCH = "torch"  # torch.save of plain containers; loads with weights_only=True


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``, as in torch."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class StateComponent:
    """One piece of training state saved to its own file(s).

    ``key`` names the files (``<key>_state*.pt``; the model's global file is
    ``model.safetensors``). ``required`` components must load; optional ones may be skipped
    when their file was deleted on purpose (partial resume).
    """

    key: str  # unique name; also the file stem
    stateful: Any  # object with state_dict() / load_state_dict()
    sharing_pattern: SharingPattern = SharingPattern.GLOBAL  # who writes, who reads
    required: bool = False  # a required component must load; the model always is
    group: str | None = None  # PER_GROUP: name of a process group given to the manager
    validation: ValidationLevel = ValidationLevel.NONE  # REPLICATED: check across ranks
    file_format: FileFormat | None = None  # None: safetensors for "model", torch otherwise
    metadata: dict[str, Any] = field(default_factory=dict)  # copied into the manifest

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharing_pattern", _enum(SharingPattern, self.sharing_pattern, self.key))
        object.__setattr__(self, "validation", _enum(ValidationLevel, self.validation, self.key))
        if self.file_format is None:
            fmt = FileFormat.SAFETENSORS if self.key == "model" else FileFormat.TORCH
        else:
            fmt = _enum(FileFormat, self.file_format, self.key)
        object.__setattr__(self, "file_format", fmt)
        if not self.key or not all(c.isalnum() or c in "_-" for c in self.key):
            raise CheckpointConfigError(
                f"Component key {self.key!r} must be non-empty letters, digits, '_' or '-': "
                "it becomes a file name."
            )
        if self.sharing_pattern is SharingPattern.PER_GROUP and not self.group:
            raise CheckpointConfigError(
                f"Component '{self.key}' is PER_GROUP but names no group: pass group='<name>' "
                "and the group itself in CheckpointManager(process_groups={'<name>': group})."
            )
        if self.group is not None and self.sharing_pattern is not SharingPattern.PER_GROUP:
            raise CheckpointConfigError(
                f"Component '{self.key}' names group {self.group!r} but is "
                f"{self.sharing_pattern.value}; only PER_GROUP components take a group."
            )
        if self.validation is not ValidationLevel.NONE and self.sharing_pattern is not SharingPattern.REPLICATED:
            raise CheckpointConfigError(
                f"Component '{self.key}' asks for {self.validation.value} validation but is "
                f"{self.sharing_pattern.value}; replication validation applies to REPLICATED only."
            )
        if not (callable(getattr(self.stateful, "state_dict", None)) and callable(getattr(self.stateful, "load_state_dict", None))):
            raise CheckpointConfigError(
                f"Component '{self.key}': {type(self.stateful).__name__} has no "
                "state_dict()/load_state_dict(); wrap it in an object that has both."
            )


def _enum(cls: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise CheckpointConfigError(
            f"Component '{key}': {value!r} is not a {cls.__name__}; use one of {allowed}."
        ) from None


def check_components(components: Sequence[StateComponent], group_names: Sequence[str] = ()) -> None:
    """Refuse component lists that cannot be saved: duplicates, unknown groups, wrong types."""
    seen: set[str] = set()
    for component in components:
        if not isinstance(component, StateComponent):
            raise CheckpointConfigError(
                f"Expected StateComponent, got {type(component).__name__}: build each entry with "
                "StateComponent(key, stateful, sharing_pattern=...)."
            )
        if component.key in seen:
            raise CheckpointConfigError(f"Duplicate component key '{component.key}'; keys must be unique.")
        seen.add(component.key)
        if component.group is not None and component.group not in group_names:
            known = ", ".join(sorted(group_names)) or "none"
            raise CheckpointConfigError(
                f"Component '{component.key}' uses unknown process group '{component.group}' "
                f"(known: {known}); pass it in CheckpointManager(process_groups=...)."
            )
