"""One line of the jobs table (or its header): fixed columns, then "last event".

Each job is its own widget so that a progress event repaints one line.
(Textual's DataTable keys its render caches on a table-wide update counter:
any cell update re-renders every visible cell, which was most of the TUI's
CPU use with a few jobs streaming.)
"""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import RenderResult
from textual.message import Message
from textual.widget import Widget

GAP = 2  # cells between columns
MIN_LAST_WIDTH = 16  # narrower than this, "last event" is left to the brief below the table
# (key, header, width); "last" takes what is left
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("job", "job", 13),
    ("state", "state", 8),
    ("progress", "progress", 16),
    ("loss", "loss", 7),
    ("rate", "st/s", 5),
    ("eta", "ETA", 5),
    ("restarts", "rst", 3),
    ("saved", "saved", 5),  # age of the newest checkpoint
)
FIXED_WIDTH = sum(width + GAP for _, _, width in COLUMNS)


def compose_line(cells: dict[str, Text], width: int) -> Text:
    """The cells laid out in their columns, cropped to `width`."""
    line = Text(no_wrap=True, overflow="ellipsis")
    for key, _, column_width in COLUMNS:
        cell = cells.get(key, Text()).copy()
        cell.truncate(column_width, overflow="ellipsis", pad=True)
        line.append_text(cell)
        line.append(" " * GAP)
    room = width - FIXED_WIDTH
    if room >= MIN_LAST_WIDTH and "last" in cells:
        last = cells["last"].copy()
        last.truncate(room, overflow="ellipsis")
        line.append_text(last)
    line.truncate(width)
    return line


class JobRow(Widget):
    DEFAULT_CSS = """
    JobRow { height: 1; padding: 0 1; }
    JobRow.-header { color: $text-accent; text-style: bold; background: $panel; }
    JobRow.-cursor { background: $boost; }
    JobsTable:focus JobRow.-cursor { background: $accent 40%; }
    """

    class Clicked(Message):
        """A row was clicked (`chain` 2: double click)."""

        def __init__(self, row: JobRow, chain: int) -> None:
            super().__init__()
            self.row = row
            self.chain = chain

    def __init__(self, name: str, *, header: bool = False) -> None:
        super().__init__(classes="-header" if header else None)
        self.job_name = name
        self.cells: dict[str, Text] = (
            {key: Text(title) for key, title, _ in COLUMNS} | {"last": Text("last event")}
            if header
            else {}
        )
        self._plain: dict[str, str] = {}

    def show(self, cells: dict[str, Text]) -> None:
        """Repaint only when some cell's text changed."""
        plain = {key: cell.plain for key, cell in cells.items()}
        if plain != self._plain:
            self._plain = plain
            self.cells = cells
            self.refresh()

    def cell_text(self, key: str) -> str:
        return self._plain.get(key, "")

    def render(self) -> RenderResult:
        return compose_line(self.cells, self.content_size.width)

    def on_click(self, event: events.Click) -> None:
        self.post_message(self.Clicked(self, event.chain))
