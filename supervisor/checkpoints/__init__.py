"""Checkpoint intelligence: validation of every format, resume selection,
quarantine, retention, disk and drift guards, the post-resume check.

Stdlib only (no torch): the daemon imports this. The watcher (`watch`, which
needs watchdog) is imported from its own module. See docs/checkpoints.md.
"""

from __future__ import annotations

from .discovery import (
    Quarantined,
    ResumeChoice,
    list_checkpoints,
    manifests_expected,
    select_resume,
    validate_all,
)
from .listing import checkpoint_listing
from .postresume import loss_jump
from .quarantine import list_quarantined, quarantine, quarantine_reason, restore
from .report import CheckpointReport, Format, checkpoint_step
from .retention import apply_retention, plan_retention
from .validate import validate_checkpoint

__all__ = [
    "CheckpointReport",
    "Format",
    "Quarantined",
    "ResumeChoice",
    "apply_retention",
    "checkpoint_listing",
    "checkpoint_step",
    "list_checkpoints",
    "list_quarantined",
    "loss_jump",
    "manifests_expected",
    "plan_retention",
    "quarantine",
    "quarantine_reason",
    "restore",
    "select_resume",
    "validate_all",
    "validate_checkpoint",
]
