"""Choosing the checkpoint a run resumes from.

Delegates to the full validator (`checkpoints.discovery.select_resume`) when it
is available; this module is the one place the daemon asks.
"""

from __future__ import annotations

import json
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


def newest_parsable(output_dir: Path) -> ResumePoint:
    """The newest `checkpoint-N` whose `trainer_state.json` parses (the minimal rule)."""
    candidates = sorted(
        ((step, p) for p in _children(output_dir) if (step := checkpoint_step(p)) is not None),
        reverse=True,
    )
    for step, path in candidates:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        return ResumePoint(path, step)
    return ResumePoint(None, 0)


def _children(output_dir: Path) -> list[Path]:
    try:
        return [p for p in output_dir.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
