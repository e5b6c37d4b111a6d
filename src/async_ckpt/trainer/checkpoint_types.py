"""The checkpoint types a custom trainer needs, under the name the Forgather guide imports them from.

``from async_ckpt.trainer.checkpoint_types import StateComponent, SharingPattern``.
"""

from ..components import FileFormat, SharingPattern, StateComponent, ValidationLevel

__all__ = ["FileFormat", "SharingPattern", "StateComponent", "ValidationLevel"]
