"""The dashboard's table: a header and one `JobRow` per job, with a cursor.

Only rows whose text changed repaint, so a progress event costs one line; the
cursor stays on the job the person is looking at when jobs come and go.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive

from ftsup.tui import format as fmt
from ftsup.tui.model import JobModel, TuiState, as_float
from ftsup.tui.widgets.job_row import JobRow
from ftsup.tui.widgets.state_text import event_kind_text, state_text

BAR_WIDTH = 6


def job_cells(job: JobModel, now: float) -> dict[str, Text]:
    """The cells of `job`'s row at wall time `now`."""
    progress = job.progress
    bar = fmt.bar(job.fraction, BAR_WIDTH) if job.fraction is not None else " " * BAR_WIDTH
    cells = {
        "job": Text(job.name, style="bold"),
        "state": state_text(job.state),
        "progress": Text(f"{bar} {fmt.step_of(job.step, job.max_steps)}"),
        "loss": Text(fmt.number(as_float(progress.get("loss")), 4)),
        "rate": Text(fmt.rate(as_float(progress.get("steps_per_s")))),
        "eta": Text(fmt.duration(as_float(progress.get("eta_s"))) if job.live else fmt.DASH),
        "restarts": Text(str(job.restarts), style="bold yellow" if job.restarts else ""),
        "saved": Text(fmt.age(as_float(progress.get("last_checkpoint_time")), now)),
    }
    last = job.last_event
    if last is None:
        cells["last"] = Text(fmt.DASH)
    else:
        text = event_kind_text(str(last.get("kind", "")))
        text.append(" " + str(last.get("message", "")))
        cells["last"] = text
    return cells


class JobsTable(Vertical, can_focus=True):
    DEFAULT_CSS = """
    JobsTable { height: 1fr; }
    JobsTable > VerticalScroll { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "app.open_job", "Open"),
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("home", "move(-1000000)", show=False),
        Binding("end", "move(1000000)", show=False),
        Binding("pageup", "move(-10)", show=False),
        Binding("pagedown", "move(10)", show=False),
    ]

    cursor_row: reactive[int] = reactive(0)

    class Highlighted(Message):
        """The cursor moved to another job."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rows: dict[str, JobRow] = {}
        self._order: list[str] = []

    def compose(self) -> ComposeResult:
        yield JobRow("", header=True)
        yield VerticalScroll(can_focus=False)

    @property
    def selected_job(self) -> str | None:
        if 0 <= self.cursor_row < len(self._order):
            return self._order[self.cursor_row]
        return None

    def cell_text(self, name: str, key: str) -> str:
        """What the row of `name` shows in column `key` (tests and the benchmark)."""
        row = self._rows.get(name)
        return row.cell_text(key) if row is not None else ""

    # data ----------------------------------------------------------------------
    def sync(
        self, state: TuiState, now: float, names: set[str] | None = None, *, roster: bool = False
    ) -> None:
        """Bring rows up to date: all of them, or the jobs in `names`."""
        order = [job.name for job in state.ordered_jobs()]
        if roster or (order != self._order and set(order) != set(self._order)):
            self._rebuild(order)
            names = None
        for name in self._order if names is None else names:
            job, row = state.jobs.get(name), self._rows.get(name)
            if job is not None and row is not None:
                row.show(job_cells(job, now))

    def tick(self, state: TuiState, now: float) -> None:
        """Refresh what ages with the clock (rows repaint only if their text changed)."""
        self.sync(state, now)

    def _rebuild(self, order: list[str]) -> None:
        selected = self.selected_job
        body = self.query_one(VerticalScroll)
        for name in set(self._rows) - set(order):
            self._rows.pop(name).remove()
        new = [JobRow(name) for name in order if name not in self._rows]
        self._rows.update({row.job_name: row for row in new})
        if new:
            body.mount_all(new)
        for index, name in enumerate(order):  # keep the widgets in table order
            row = self._rows[name]
            if index < len(body.children) and body.children[index] is not row:
                body.move_child(row, before=index)
        self._order = order
        self.cursor_row = order.index(selected) if selected in order else 0
        self._show_cursor()

    # cursor --------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        if self._order:
            self.cursor_row = max(0, min(len(self._order) - 1, self.cursor_row + delta))

    def watch_cursor_row(self, old: int, new: int) -> None:
        self._show_cursor()
        if old != new:
            self.post_message(self.Highlighted())

    def _show_cursor(self) -> None:
        for index, name in enumerate(self._order):
            row = self._rows[name]
            row.set_class(index == self.cursor_row, "-cursor")
            if index == self.cursor_row and row.is_mounted:
                self.query_one(VerticalScroll).scroll_to_widget(row, animate=False)

    async def on_job_row_clicked(self, event: JobRow.Clicked) -> None:
        event.stop()
        if event.row.job_name in self._order:
            self.focus()
            self.cursor_row = self._order.index(event.row.job_name)
            if event.chain >= 2:
                await self.run_action("app.open_job")
