"""ftsup.supervisor.health."""
