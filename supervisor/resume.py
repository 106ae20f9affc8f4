"""The checkpoint a run resumes from, as the daemon's runner sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ResumePoint:
    path: Path | None
    step: int
    quarantined: list[tuple[Path, str]] = field(default_factory=list)  # (new path, reason)
