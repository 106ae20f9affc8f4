"""The daemon's open-file limit, and the user's given back to their runs.

The daemon raises its soft RLIMIT_NOFILE to the hard limit (a burst of clients
or checkpoint checks must not run it out of descriptors at the usual 1024).
Trainers must run under the limits their user set, as they would without
ftsup: the daemon passes the old soft limit in the environment and each shim
restores it before it starts anything.
"""

from __future__ import annotations

import contextlib
import os
import resource

from ftsup.supervisor.contract import ENV_USER_NOFILE


def raise_for_daemon() -> tuple[int, int]:
    """Soft limit up to the hard one; returns (old soft, new soft). When it
    changed, the old one is left in the environment for the shims."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    os.environ[ENV_USER_NOFILE] = str(soft)
    return soft, target


def restore_for_run() -> None:
    """In a shim: the user's soft limit back (inherited by the trainer), and the
    variable gone from the environment the trainer sees."""
    value = os.environ.pop(ENV_USER_NOFILE, None)
    if value is None or not value.isdigit():
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A limit we cannot set is no reason not to run the trainer.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(value), hard), hard))
