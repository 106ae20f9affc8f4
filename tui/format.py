"""Short, fixed-width renderings of numbers, durations and ages for table cells.

Every cell of the dashboard has a few columns at 80x24, so each formatter here
promises a maximum width and never raises on missing (None) data: the daemon
leaves fields empty until a trainer reports them.
"""

from __future__ import annotations

import math
import time

DASH = "–"


def duration(seconds: float | None) -> str:
    """`42s`, `12m`, `3h05`, `2d04` (at most 5 characters)."""
    if seconds is None or not math.isfinite(seconds):
        return DASH
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}" if days < 100 else f"{days}d"


def age(then: float | None, now: float) -> str:
    """How long ago `then` was, as `duration` renders it."""
    if then is None:
        return DASH
    return duration(now - then)


def number(value: float | None, digits: int = 4) -> str:
    """A loss or rate in `digits` significant digits (`1.234`, `0.0123`, `1.2e-05`)."""
    if value is None:
        return DASH
    if not math.isfinite(value):
        return str(value)  # nan / inf are exactly what a person needs to see
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10**digits or magnitude < 10**-3:
        return f"{value:.{max(1, digits - 2)}e}"
    return f"{value:.{digits}g}"


def rate(value: float | None) -> str:
    """Steps per second: `12.3`, `0.45`, or `–`."""
    if value is None or not math.isfinite(value):
        return DASH
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def size(count: int | None) -> str:
    """Bytes as `812B`, `1.5K`, `42M`, `3.1G`."""
    if count is None:
        return DASH
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.0f}T"  # pragma: no cover - the loop returns


def clock_time(ts: float | None) -> str:
    """Local `HH:MM:SS` of a wall time (the event timeline)."""
    if ts is None:
        return DASH
    return time.strftime("%H:%M:%S", time.localtime(ts))


def date_time(ts: float | None) -> str:
    """Local `MM-DD HH:MM:SS` for times that may be days old."""
    if ts is None:
        return DASH
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def bar(fraction: float | None, width: int) -> str:
    """A text progress bar with eighth-cell resolution (`█████▌   `)."""
    if width <= 0:
        return ""
    if fraction is None or not math.isfinite(fraction):
        return "·" * width
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part and full < width else ""
    return ("█" * full + partial).ljust(width, "░")[:width]


def step_of(step: int | None, max_steps: int | None) -> str:
    """`120/3000`, or `120` when the run has no known end."""
    if step is None:
        return DASH
    return f"{step}/{max_steps}" if max_steps else str(step)


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` cells with an ellipsis."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
