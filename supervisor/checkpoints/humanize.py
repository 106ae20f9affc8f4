"""Byte counts for people (messages and the CLI)."""

from __future__ import annotations


def format_bytes(count: int) -> str:
    """1536 -> "1.5 KiB"; binary units, because disks and `df -h` use them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
