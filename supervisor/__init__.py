"""ftsup supervisor: daemon, job spec, restart policy, checkpoints, CLI.

Never imports torch: the daemon is a small, always-on process.
"""

__version__ = "0.1.0"
