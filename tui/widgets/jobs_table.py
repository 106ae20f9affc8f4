"""The dashboard's table: one row per job, updated cell by cell.

Rows are keyed by job name and only cells whose text changed are written, so
a progress event costs a few cell updates, not a table rebuild, and the cursor
stays on the job the person is looking at.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from ftsup.tui import format as fmt
from ftsup.tui.model import JobModel, TuiState, as_float
from ftsup.tui.widgets.state_text import event_kind_text, state_text

BAR_WIDTH = 6
MIN_LAST_WIDTH = 16
# (key, header, width)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("job", "job", 14),
    ("state", "state", 8),
    ("progress", "progress", BAR_WIDTH + 10),
    ("loss", "loss", 6),
    ("rate", "st/s", 5),
    ("eta", "ETA", 5),
    ("restarts", "rst", 3),
    ("ckpt", "ckpt", 5),
    ("last", "last event", 44),
)


def job_cells(job: JobModel, now: float, last_width: int = 44) -> dict[str, Text]:
    """The cells of `job`'s row at wall time `now`."""
    progress = job.progress
    bar = fmt.bar(job.fraction, BAR_WIDTH) if job.fraction is not None else " " * BAR_WIDTH
    cells = {
        "job": Text(fmt.shorten(job.name, 14), style="bold"),
        "state": state_text(job.state),
        "progress": Text(f"{bar} {fmt.step_of(job.step, job.max_steps)}"),
        "loss": Text(fmt.number(as_float(progress.get("loss")), 4)),
        "rate": Text(fmt.rate(as_float(progress.get("steps_per_s")))),
        "eta": Text(fmt.duration(as_float(progress.get("eta_s"))) if job.live else fmt.DASH),
        "restarts": Text(str(job.restarts), style="bold yellow" if job.restarts else ""),
        "ckpt": Text(fmt.age(as_float(progress.get("last_checkpoint_time")), now)),
    }
    last = job.last_event
    if last is None:
        cells["last"] = Text(fmt.DASH)
    else:
        kind = str(last.get("kind", ""))
        text = event_kind_text(kind)
        text.append(" " + fmt.shorten(str(last.get("message", "")), last_width - len(kind) - 1))
        cells["last"] = text
    return cells


class JobsTable(DataTable[Text]):
    DEFAULT_CSS = """
    JobsTable { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Open")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._shown: dict[str, dict[str, str]] = {}
        self._order: list[str] = []
        self._state: TuiState | None = None
        self._now = 0.0
        self.last_width = COLUMNS[-1][2]
        self.with_last = True

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, header, width in COLUMNS:
            if key != "last" or self.with_last:
                self.add_column(header, width=self.last_width if key == "last" else width, key=key)

    def on_resize(self, event: events.Resize) -> None:
        """Give "last event" the width the other columns leave; drop it when that is too little.

        (At 80 columns the brief under the table spells the last event out.)
        """
        fixed = sum(width + 2 * self.cell_padding for _, _, width in COLUMNS[:-1])
        room = event.size.width - fixed - 2 * self.cell_padding - 1
        with_last = room >= MIN_LAST_WIDTH
        width = max(MIN_LAST_WIDTH, room)
        if with_last == self.with_last and (not with_last or width == self.last_width):
            return
        self.with_last, self.last_width = with_last, width
        selected = self.selected_job
        self.clear(columns=True)
        self._add_columns()
        if self._state is not None:
            order = [job.name for job in self._state.ordered_jobs()]
            self._rebuild(self._state, order, self._now, selected)

    @property
    def selected_job(self) -> str | None:
        if not self._order or self.cursor_row < 0 or self.cursor_row >= len(self._order):
            return None
        return self._order[self.cursor_row]

    def sync(
        self, state: TuiState, now: float, names: set[str] | None = None, *, roster: bool = False
    ) -> None:
        """Bring rows up to date: all of them, or the jobs in `names`."""
        self._state, self._now = state, now
        order = [job.name for job in state.ordered_jobs()]
        if roster or set(order) != set(self._order):
            self._rebuild(state, order, now)
            return
        for name in self._order if names is None else names:
            job = state.jobs.get(name)
            if job is not None:
                self._update_row(job, now)

    def tick(self, state: TuiState, now: float) -> None:
        """Refresh the cells that age with the clock (the time since the last checkpoint)."""
        for name in self._order:
            job = state.jobs.get(name)
            if job is not None:
                self._update_row(job, now, only=("ckpt",))

    def _rebuild(
        self, state: TuiState, order: list[str], now: float, selected: str | None = None
    ) -> None:
        selected = selected or self.selected_job
        self.clear()
        self._shown = {}
        self._order = order
        for name in order:
            cells = job_cells(state.jobs[name], now, self.last_width)
            self._shown[name] = {k: v.plain for k, v in cells.items()}
            self.add_row(
                *(cells[k] for k, _, _ in COLUMNS if k != "last" or self.with_last), key=name
            )
        if selected in order:
            self.move_cursor(row=order.index(selected), animate=False)

    def _update_row(self, job: JobModel, now: float, only: tuple[str, ...] | None = None) -> None:
        shown = self._shown.get(job.name)
        if shown is None:
            return
        for key, cell in job_cells(job, now, self.last_width).items():
            if (only is not None and key not in only) or (key == "last" and not self.with_last):
                continue
            if shown.get(key) != cell.plain:
                shown[key] = cell.plain
                self.update_cell(job.name, key, cell)
