"""A job state as styled text: shared by the dashboard, the job header and the brief.

Each state keeps a distinct word (not only a colour), so the picture still
reads under NO_COLOR.
"""

from __future__ import annotations

from rich.text import Text

STATE_STYLES = {
    "running": "bold green",
    "starting": "green",
    "pending": "yellow",
    "stopping": "yellow",
    "backoff": "bold yellow",
    "gave_up": "bold red",
    "failed": "bold red",
    "finished": "bold blue",
    "stopped": "dim",
}

EVENT_STYLES = {
    "attempt_started": "green",
    "attempt_exited": "yellow",
    "restart": "bold yellow",
    "finished": "bold blue",
    "gave_up": "bold red",
    "failed": "bold red",
    "stopped": "dim",
    "quarantine": "bold magenta",
    "checkpoint": "cyan",
    "checkpoint_requested": "cyan",
    "hang": "bold red",
    "gpu_fault": "bold red",
    "warning": "yellow",
    "loss_anomaly": "bold magenta",
}


def state_text(state: str) -> Text:
    """The state as a styled span (not a base style, so appended text stays plain)."""
    return Text().append(state, style=STATE_STYLES.get(state, ""))


def event_kind_text(kind: str) -> Text:
    return Text().append(kind, style=EVENT_STYLES.get(kind, "dim"))
