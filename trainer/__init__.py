"""ftsup's built-in trainer: transformers Trainer + peft, with exact resume.

Importing this package is cheap (no torch): the supervisor imports its pure
modules (`launch`, `checkpointing`, `data`). `FtsupCallback` is loaded on first
use, so `from ftsup.trainer import FtsupCallback` works in any HF script.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftsup.trainer.callback import FtsupCallback

__all__ = ["FtsupCallback"]


def __getattr__(name: str) -> Any:
    if name == "FtsupCallback":
        from ftsup.trainer.callback import FtsupCallback

        return FtsupCallback
    raise AttributeError(f"module 'ftsup.trainer' has no attribute {name!r}")
