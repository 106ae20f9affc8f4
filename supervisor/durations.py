"""Durations ("90s", "10m", "2h", or seconds) and sizes ("20G", or bytes) in job files."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
# The longest duration a job file may give: every wait ftsup takes is far shorter,
# and a bound keeps the arithmetic (deadlines, ETAs, backoff) and the output sane.
MAX_DURATION = 30 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from `"90s"`, `"10m"`, `"2h"`, `"1d"`, or a non-negative number."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "90s" or "10m", got {value!r}')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f'expected a duration such as "90s", "10m" or "2h", got {value!r}')


def parse_size(value: object) -> int:
    """Bytes from `"20G"`, `"512MiB"`, `"1.5T"`, or a non-negative integer."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size such as "20G", got {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "B").upper().rstrip("B").rstrip("I")
            power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
            return int(float(match.group(1)) * 1024**power)
    raise ValueError(f'expected a size such as "20G" or "512M", got {value!r}')


def format_duration(seconds: float) -> str:
    """Short human form: 45s, 12m05s, 3h07m, 2d04h; ">9999d" beyond (or not a number)."""
    if not seconds < 10_000 * 86400:  # also NaN: never a 300-digit line in `status`
        return ">9999d"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
