"""The two guards the daemon consults around launches and saves.

Disk (`disk_verdict`, `check_disk`): pause before ENOSPC corrupts a save.
Drift (`compare_fingerprints`, `diff_fingerprints`): refuse a resume whose
batch geometry, data, model or world size changed. Each lives in its own
module; this one is the place the daemon imports them from.
"""

from __future__ import annotations

from .disk_guard import (
    DiskLevel,
    DiskVerdict,
    check_disk,
    disk_verdict,
    free_bytes,
    last_checkpoint_bytes,
)
from .drift_guard import (
    Drift,
    compare_fingerprints,
    diff_fingerprints,
    drift_refused,
    make_fingerprint,
)

__all__ = [
    "DiskLevel",
    "DiskVerdict",
    "Drift",
    "check_disk",
    "compare_fingerprints",
    "diff_fingerprints",
    "disk_verdict",
    "drift_refused",
    "free_bytes",
    "last_checkpoint_bytes",
    "make_fingerprint",
]
