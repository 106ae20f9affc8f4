"""The verdict on one checkpoint folder, and how folder names map to steps.

One frozen type shared by validation, resume selection, retention, the watcher
and the CLI, so that the daemon stores and shows exactly what was decided.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ftsup.supervisor.contract import CHECKPOINT_RE

Format = Literal["ftsup", "hf", "deepspeed", "unknown"]

# `\Z`, not `$`, as the contract's CHECKPOINT_RE: no "checkpoint-8\n".
QUARANTINED_RE = re.compile(r"\Acheckpoint-([0-9]+)\.invalid-(.+)\Z", re.DOTALL)


def checkpoint_step(path: Path) -> int | None:
    """The step in a `checkpoint-<N>` (or quarantined `checkpoint-<N>.invalid-*`) name."""
    match = CHECKPOINT_RE.match(path.name) or QUARANTINED_RE.match(path.name)
    return int(match.group(1)) if match else None


def _frozen(data: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(data or {}))


@dataclass(frozen=True)
class CheckpointReport:
    """What validation found. `valid`: complete and readable; `resumable`: also
    holds the training state (optimizer, scheduler, RNG) that a resume needs.

    `reason` is the first problem, in words a person can act on; every problem
    is in `details["problems"]`, remarks that do not invalidate in
    `details["notes"]`. `checked` False: a read failed for a reason outside the
    bytes (EMFILE, EACCES, EIO, a deadline), so nothing is known: neither valid
    nor invalid, never a reason to quarantine or delete.
    """

    path: Path
    step: int | None
    format: Format
    valid: bool
    resumable: bool
    reason: str | None
    size_bytes: int
    mtime: float
    details: Mapping[str, Any] = field(default_factory=_frozen)
    checked: bool = True

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(self.details.get("problems", ()))

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.details.get("notes", ()))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, for the CLI's --json, the socket and the state database."""
        return {
            "path": str(self.path),
            "step": self.step,
            "format": self.format,
            "valid": self.valid,
            "resumable": self.resumable,
            "reason": self.reason,
            "size_bytes": self.size_bytes,
            "mtime": self.mtime,
            "details": _plain(self.details),
            "checked": self.checked,
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
