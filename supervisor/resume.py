"""The checkpoint a run resumes from, as the daemon's runner sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ResumePoint:
    path: Path | None
    step: int
    quarantined: list[tuple[Path, str]] = field(default_factory=list)  # (new path, reason)


class CheckpointsUncheckable(Exception):
    """The checkpoints could not be checked (EMFILE, EIO, EACCES, ESTALE, a deadline).

    "Could not check" is never "corrupt": nothing was quarantined, and the
    launch waits and tries again rather than resuming from an older step or
    from scratch. `reason` names the folder and the error for the event.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
