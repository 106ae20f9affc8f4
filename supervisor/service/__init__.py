"""ftsup.supervisor.service."""
