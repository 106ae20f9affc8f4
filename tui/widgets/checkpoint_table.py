"""A job's checkpoints: step, age, size, valid (or why not), resumable ("next": the one
a restart would resume from; quarantined folders are listed as invalid).

The daemon validates checkpoints; this only shows its verdicts. An older daemon
without the `checkpoints` request gets a one-line note instead of a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from ftsup.tui import format as fmt
from ftsup.tui.model import as_float, as_int

COLUMNS = (
    ("step", "step", 7),
    ("age", "age", 5),
    ("size", "size", 6),
    ("valid", "valid", 24),
    ("resumable", "resume", 6),
    ("path", "folder", 60),
)


def checkpoint_cells(item: dict[str, Any], now: float) -> list[Text]:
    valid = item.get("valid") is True
    reason = fmt.shorten(f"invalid: {item.get('reason') or '?'}", 24)
    verdict = Text("valid", style="green") if valid else Text(reason, style="bold red")
    resumable = item.get("resumable") is True
    if item.get("resume_candidate") is True:  # what a restart would resume from
        resume = Text("next", style="bold green")
    else:
        resume = Text("yes" if resumable else "no", style="" if resumable else "yellow")
    step = as_int(item.get("step"))
    return [
        Text(str(step) if step is not None else fmt.DASH, style="bold"),
        Text(fmt.age(as_float(item.get("mtime")), now)),
        Text(fmt.size(as_int(item.get("size_bytes")))),
        verdict,
        resume,
        Text(Path(str(item.get("path", ""))).name),
    ]


class CheckpointTable(Vertical):
    DEFAULT_CSS = """
    CheckpointTable { height: 1fr; }
    CheckpointTable > .ckpt-note { color: $text-muted; padding: 0 1; height: auto; }
    CheckpointTable > DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static("loading…", classes="ckpt-note")
        table: DataTable[Text] = DataTable(cursor_type="row")
        yield table

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, header, width in COLUMNS:
            table.add_column(header, width=width, key=key)

    def show(self, checkpoints: list[dict[str, Any]] | None, note: str | None, now: float) -> None:
        table: DataTable[Text] = self.query_one(DataTable)
        note_widget = self.query_one(".ckpt-note", Static)
        table.clear()
        if checkpoints is None:
            note_widget.update(note or "loading…")
            table.display = False
            return
        table.display = True
        note_widget.update(
            note or (f"{len(checkpoints)} checkpoints" if checkpoints else "no checkpoints yet")
        )
        for item in checkpoints:
            table.add_row(*checkpoint_cells(item, now))
