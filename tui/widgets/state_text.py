"""A job state or an event kind as styled text: shared by the dashboard, the job
header, the brief and the timelines.

State colours come from `protocol.STATE_STYLES`, the table the CLI uses too.
Each state keeps a distinct word (not only a colour), so the picture still
reads under NO_COLOR. Event styles are keyed by `EventKind`, and every kind has
one (a test walks the enum), so a renamed or new kind cannot fall back to dim
unnoticed.
"""

from __future__ import annotations

from rich.text import Text

from ftsup.supervisor.protocol import STATE_STYLES, EventKind
from ftsup.tui import format as fmt

EVENT_STYLES: dict[str, str] = {
    # a job's life
    EventKind.SUBMITTED: "dim",
    EventKind.ADOPTED: "dim",
    EventKind.LAUNCH_WAIT: "yellow",
    EventKind.QUEUED: "cyan",
    EventKind.BLOCKED: "magenta",
    EventKind.PLACED: "green",
    EventKind.PREEMPTED: "bold yellow",
    EventKind.PRIORITY: "cyan",
    EventKind.RESIZED: "yellow",
    EventKind.WAITING_FOR_NODES: "yellow",
    EventKind.NODES_JOINED: "green",
    EventKind.ATTEMPT_STARTED: "green",
    EventKind.ATTEMPT_EXITED: "yellow",
    EventKind.RESTART: "bold yellow",
    EventKind.FINISHED: "bold blue",
    EventKind.STOPPED: "dim",
    EventKind.GAVE_UP: "bold red",
    EventKind.FAILED: "bold red",
    EventKind.DRIFT: "bold yellow",
    EventKind.SIGNAL: "yellow",
    EventKind.STANDBY_READY: "dim",
    EventKind.STANDBY_LOST: "yellow",
    EventKind.MEMORY_RESUME: "cyan",
    # health
    EventKind.HUNG: "bold red",
    EventKind.STACKS: "dim",
    EventKind.LOSS_ANOMALY: "bold magenta",
    EventKind.GPU_FAULT: "bold red",
    EventKind.GPU_RESET: "green",
    EventKind.WARNING: "yellow",
    # checkpoints and disk
    EventKind.CHECKPOINT: "cyan",
    EventKind.SAVE_REQUESTED: "cyan",
    EventKind.QUARANTINE: "bold magenta",
    EventKind.RETENTION: "dim",
    EventKind.DISK_GUARD: "bold yellow",
    # the daemon
    EventKind.DAEMON_STARTED: "dim",
    EventKind.DEGRADED: "dim",  # the connection bar shows it in red while it lasts
    EventKind.RECOVERED: "dim",
    EventKind.STATE_REBUILT: "bold yellow",
    # notification outcomes
    EventKind.NOTIFY_DELIVERED: "dim",
    EventKind.NOTIFY_RETRY: "yellow",
    EventKind.NOTIFY_FAILED: "bold red",
    EventKind.NOTIFY_DROPPED: "yellow",
    # streamed only; shown when a recording or a future view lists them
    EventKind.PROGRESS: "dim",
    EventKind.LOG: "dim",
    EventKind.GPU: "dim",
    EventKind.STATE: "dim",
    EventKind.LAGGED: "yellow",
}
UNKNOWN_KIND_STYLE = "dim"  # a newer daemon's kind this TUI does not know


def state_text(state: str) -> Text:
    """The state as a styled span (not a base style, so appended text stays plain)."""
    return Text().append(state, style=STATE_STYLES.get(state, ""))


def event_kind_text(kind: str, width: int | None = None) -> Text:
    """The kind in its style, cut to `width` cells for display. The style is looked
    up by the whole kind: a kind cut short must not lose its colour."""
    shown = kind if width is None else fmt.shorten(kind, width)
    return Text().append(shown, style=EVENT_STYLES.get(kind, UNKNOWN_KIND_STYLE))
