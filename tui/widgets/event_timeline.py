"""Durable events, newest last: starts, exits, restarts, checkpoints, faults.

One job's (the job screen) or every job's (the dashboard, with a job column).

Appends are incremental (a new event adds one row); only an out-of-order
arrival (a late history answer) rebuilds the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from ftsup.tui import format as fmt
from ftsup.tui.model import as_float, as_int
from ftsup.tui.widgets.state_text import event_kind_text

COLUMNS = (
    ("time", "time", 8),
    ("job", "job", 14),
    ("kind", "event", 15),
    ("message", "what happened", 200),
)


def event_cells(event: dict[str, Any], with_job: bool = False) -> list[Text]:
    cells = [
        Text(fmt.clock_time(as_float(event.get("ts"))), style="dim"),
        Text(fmt.shorten(str(event.get("job") or "daemon"), 14), style="bold"),
        event_kind_text(str(event.get("kind", "")), 15),
        Text(str(event.get("message", ""))),
    ]
    return cells if with_job else [cells[0], *cells[2:]]


class EventTimeline(DataTable[Text]):
    DEFAULT_CSS = """
    EventTimeline { height: 1fr; }
    """

    def __init__(self, *, with_job: bool = False, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self.with_job = with_job
        self._ids: list[int | None] = []

    def on_mount(self) -> None:
        for key, header, width in COLUMNS:
            if key != "job" or self.with_job:
                self.add_column(header, width=width, key=key)

    def show(self, events: Sequence[dict[str, Any]]) -> None:
        ids = [as_int(e.get("id")) for e in events]
        if ids[: len(self._ids)] == self._ids and len(ids) >= len(self._ids):
            new = events[len(self._ids) :]
        else:
            self.clear()
            self._ids = []
            new = events
        at_end = self.cursor_row >= self.row_count - 1
        for event in new:
            self.add_row(*event_cells(event, self.with_job))
        self._ids = ids
        if new and at_end:
            self.move_cursor(row=self.row_count - 1, animate=False)
