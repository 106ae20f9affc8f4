"""The one shape of a checkpoint listing: `ftsup ckpt ls --json` and the daemon's
`checkpoints` request both return `checkpoint_listing(...)`, so a script, the CLI
and the TUI read the same keys whichever of the two answered (docs/checkpoints.md).

Listing only judges; it never quarantines (that is resume selection's job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .discovery import validate_all
from .quarantine import list_quarantined, quarantine_reason
from .report import checkpoint_step


def checkpoint_listing(
    output_dir: Path,
    *,
    world_size: int | None = None,
    require_manifest: bool | None = None,
) -> dict[str, Any]:
    """Every `checkpoint-N` by step with its verdict, the one a restart would
    resume from, and the quarantined folders with their recorded reasons.

    `require_manifest=None`: expected when any checkpoint here has one (as
    `validate_all`); the daemon passes True for `[train]` jobs, as it resumes.
    Raises OSError when the folder cannot be read (the caller says so).
    """
    reports = validate_all(output_dir, world_size=world_size, require_manifest=require_manifest)
    resume = next((r for r in reversed(reports) if r.resumable), None)
    return {
        "output_dir": str(output_dir),
        "checkpoints": [{**r.to_json(), "resume_candidate": r is resume} for r in reports],
        "resume_from": str(resume.path) if resume is not None else None,
        "quarantined": [
            {"path": str(p), "step": checkpoint_step(p), "reason": quarantine_reason(p)}
            for p in list_quarantined(output_dir)
        ],
    }
