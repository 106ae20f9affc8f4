"""A collector that the format checkers fill in while they look at a folder.

Problems make a checkpoint invalid; `not_resumable` reasons leave it valid but
useless to resume from (weights only); notes are for people. Kept apart from
the frozen report so that checkers stay small and composable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    not_resumable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # Reads that failed for a reason outside the bytes (EMFILE, EACCES, EIO, a
    # deadline): the folder could not be judged, which is never "corrupt".
    unchecked: list[str] = field(default_factory=list)

    def could_not_check(self, message: str) -> None:
        if message not in self.unchecked:
            self.unchecked.append(message)

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def weights_only(self, message: str) -> None:
        if message not in self.not_resumable:
            self.not_resumable.append(message)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unchecked
