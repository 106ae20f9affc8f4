"""LLaMA-Factory 0.9.5, unmodified, under ftsup (issue 14); see run.py."""
