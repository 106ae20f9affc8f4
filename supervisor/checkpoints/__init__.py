"""ftsup.supervisor.checkpoints."""
