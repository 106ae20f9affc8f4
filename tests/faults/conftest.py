"""Faults of the environment (issue 12): each test reproduces one way the
machine misbehaved under a real daemon and asserts that no run was lost."""
