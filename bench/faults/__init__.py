"""Fault suite (issue 12): faults of the environment against a real daemon; see run.py."""
