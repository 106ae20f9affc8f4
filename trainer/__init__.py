"""ftsup."""
