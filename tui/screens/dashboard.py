"""The first screen: every job, the GPUs, and the highlighted job in full."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult

from ftsup.tui.model import Change, TuiState
from ftsup.tui.screens.base import StateScreen
from ftsup.tui.widgets.connection_bar import ConnectionBar
from ftsup.tui.widgets.event_timeline import EventTimeline
from ftsup.tui.widgets.footer import KeyFooter
from ftsup.tui.widgets.gpu_strip import GpuStrip
from ftsup.tui.widgets.job_brief import JobBrief
from ftsup.tui.widgets.jobs_table import JobsTable


class DashboardScreen(StateScreen):
    def __init__(self, state: TuiState, clock: Callable[[], float]) -> None:
        super().__init__(state, clock)

    def compose(self) -> ComposeResult:
        yield ConnectionBar(id="connection")
        yield GpuStrip(id="gpus")
        yield JobsTable(id="jobs")
        yield EventTimeline(with_job=True, id="recent")
        yield JobBrief(id="brief")
        yield KeyFooter()

    DEFAULT_CSS = """
    DashboardScreen #recent { height: 1fr; border-top: solid $panel-lighten-2; }
    """
    TALL_ENOUGH_FOR_EVENTS = 34  # below this the table and the brief need every line

    def on_mount(self) -> None:
        self.query_one(JobsTable).focus()
        recent = self.query_one("#recent", EventTimeline)
        recent.can_focus = False
        recent.show_cursor = False

    def on_resize(self) -> None:
        self.query_one("#recent").display = self.size.height >= self.TALL_ENOUGH_FOR_EVENTS

    @property
    def table(self) -> JobsTable:
        return self.query_one(JobsTable)

    def current_job(self) -> str | None:
        return self.table.selected_job

    def sync_all(self) -> None:
        now = self.clock()
        self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        self.query_one(GpuStrip).show(self.state.gpus)
        self.table.sync(self.state, now, roster=True)
        self.query_one("#recent", EventTimeline).show(list(self.state.timeline))
        self._show_brief()

    def sync(self, change: Change) -> None:
        now = self.clock()
        if change.connection or change.jobs or change.roster:
            self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        if change.gpus:
            self.query_one(GpuStrip).show(self.state.gpus)
        if "" in change.events:
            self.query_one("#recent", EventTimeline).show(list(self.state.timeline))
        if change.jobs or change.roster:
            self.table.sync(self.state, now, change.jobs, roster=change.roster)
            selected = self.current_job()
            if change.roster or selected in change.jobs:
                self._show_brief()

    def tick(self) -> None:
        self.table.tick(self.state, self.clock())
        self._show_brief()

    def _show_brief(self) -> None:
        name = self.current_job()
        job = self.state.jobs.get(name) if name else None
        self.query_one(JobBrief).show(job, self.clock())

    def on_jobs_table_highlighted(self, event: JobsTable.Highlighted) -> None:
        self._show_brief()
