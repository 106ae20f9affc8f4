"""The checkpoint a run resumes from, as the daemon's runner sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class ResumePoint:
    path: Path | None
    step: int
    quarantined: list[tuple[Path, str]] = field(default_factory=list)  # (new path, reason)


def checkpoint_step(path: Path) -> int | None:
    match = _CKPT.match(path.name)
    return int(match.group(1)) if match else None
