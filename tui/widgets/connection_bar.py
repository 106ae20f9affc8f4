"""The top line: whether the daemon is reachable, and how many jobs are in which state
(running, waiting in the GPU queue when any do, failing, finished, stopped).

It is the one place that says "reconnecting…", so a person never mistakes a
frozen picture for a healthy run. It renders at its real width (shortening the
labels at 80 columns), so `show` only stores what to draw.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from ftsup.tui.format import shorten
from ftsup.tui.model import ConnectionInfo

LONG_LABELS = ("running", "waiting", "failing", "finished", "stopped")
SHORT_LABELS = ("run", "wait", "fail", "done", "stop")
STYLES = ("green", "cyan", "red", "blue", "")
SHOWN_IF_ANY = frozenset({"waiting"})  # queued/blocked jobs: only on a shared server


def counts_text(counts: dict[str, int], labels: tuple[str, ...]) -> Text:
    text = Text()
    for key, label, style in zip(LONG_LABELS, labels, STYLES, strict=True):
        if key in SHOWN_IF_ANY and not counts.get(key):
            continue
        if text:
            text.append(" · ", style="dim")
        text.append(str(counts.get(key, 0)), style=f"bold {style}".strip())
        text.append(f" {label}")
    return text


def bar_text(connection: ConnectionInfo, counts: dict[str, int], width: int) -> Text:
    up = connection.state in ("connected", "replay")
    head = Text("ftsup ", style="bold")
    if up and connection.degraded:
        # The daemon supervises from memory: say so before anything else.
        head.append("● ", style="bold red")
        head.append("degraded", style="bold red")
        detail = f": {connection.degraded}"
    elif up:
        head.append("● ", style="bold green")
        head.append("connected")
        pid = connection.daemon.get("daemon_pid")
        detail = f" (daemon {pid})" if pid else ""
        nodes = connection.daemon.get("nodes")  # several daemons (tui/multi.py)
        if isinstance(nodes, str):
            detail = f" {nodes}"
    else:
        label = "connecting…" if connection.state == "connecting" else "reconnecting…"
        head.append(f"◌ {label}", style="bold yellow")
        detail = ""
        if connection.attempt:
            detail = f" try {connection.attempt + 1}"
            if connection.retry_in is not None:
                detail += f" in {connection.retry_in:.1f}s"
        if connection.reason:
            detail += f": {connection.reason}"
    summary = counts_text(counts, LONG_LABELS)
    wanted = len(head) + len(summary) + 2 + (0 if up else len(detail))
    if wanted > width:  # a reconnect's reason matters more than long labels
        summary = counts_text(counts, SHORT_LABELS)
    room = width - len(head) - len(summary) - 2
    node_down = bool(connection.daemon.get("nodes_down"))
    if up and len(detail) > room and not connection.degraded and not node_down:
        detail = ""  # the counts matter more than the daemon's pid
    if detail and room > 0:
        style = "red" if connection.degraded else "yellow" if node_down else "" if up else "dim"
        head.append(shorten(detail, room), style=style)
    head.append(" " * max(2, width - len(head) - len(summary)))
    head.append_text(summary)
    head.truncate(width)
    return head


class ConnectionBar(Widget):
    DEFAULT_CSS = """
    ConnectionBar {
        height: 1;
        background: $panel;
        color: $text;
        padding: 0 1;
    }
    ConnectionBar.-down {
        background: $error 40%;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._connection = ConnectionInfo()
        self._counts: dict[str, int] = {}
        self._key: object = None

    def show(self, connection: ConnectionInfo, counts: dict[str, int]) -> None:
        """Draw `connection` and the job `counts` (from TuiState.counts)."""
        key = (
            connection.state,
            connection.attempt,
            connection.reason,
            connection.retry_in,
            connection.daemon.get("daemon_pid"),
            connection.daemon.get("nodes"),
            connection.degraded,
            sorted(counts.items()),
        )
        if key == self._key:
            return  # unchanged: no repaint
        self._key = key
        self._connection = connection
        self._counts = dict(counts)
        self.set_class(connection.state == "reconnecting", "-down")
        self.refresh()

    def render(self) -> RenderResult:
        return bar_text(self._connection, self._counts, self.content_size.width or 78)
