"""One job in depth: curves, checkpoints, events, log, and its GPUs.

Tabs keep it usable at 80x24. Widgets on tabs that are not shown are only
marked stale and redrawn when their tab is opened, so a streaming log costs
nothing while the curves are on screen, and the other way round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.timer import Timer
from textual.widgets import TabbedContent, TabPane

from ftsup.tui.model import Change, JobModel, TuiState, as_int
from ftsup.tui.screens.base import StateScreen
from ftsup.tui.widgets.checkpoint_table import CheckpointTable
from ftsup.tui.widgets.connection_bar import ConnectionBar
from ftsup.tui.widgets.event_timeline import EventTimeline
from ftsup.tui.widgets.footer import KeyFooter
from ftsup.tui.widgets.gpu_strip import GpuStrip
from ftsup.tui.widgets.job_header import JobHeader
from ftsup.tui.widgets.line_chart import ChartSeries, LineChart
from ftsup.tui.widgets.log_view import LogView

TABS = ("curves", "checkpoints", "events", "log")
MIN_REDRAW_INTERVAL_S = {"curves": 0.5, "log": 0.25}
# What the app should (re)load for this screen: part names of FtsupApp.load_job.
Reload = Callable[[str, tuple[str, ...]], None]


class JobScreen(StateScreen):
    DEFAULT_CSS = """
    JobScreen TabbedContent { height: 1fr; }
    JobScreen TabPane { padding: 0; }
    JobScreen #loss-chart { height: 1fr; min-height: 5; }
    JobScreen #lr-chart { height: 5; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("1", "show_tab('curves')", "Curves", show=False),
        Binding("2", "show_tab('checkpoints')", "Checkpoints", show=False),
        Binding("3", "show_tab('events')", "Events", show=False),
        Binding("4", "show_tab('log')", "Log", show=False),
    ]

    def __init__(
        self,
        state: TuiState,
        clock: Callable[[], float],
        job: str,
        reload: Reload,
        *,
        tab: str = "curves",
    ) -> None:
        super().__init__(state, clock)
        self.job_name = job
        self._reload = reload
        self._initial_tab = tab
        self._stale_tabs: set[str] = set(TABS)
        self._last_ckpt_step: int | None = None
        self.loaded = asyncio.Event()  # set by the app once the first load has been shown
        self._drawn_at: dict[str, float] = {}
        self._redraw_timers: dict[str, Timer] = {}

    @property
    def job(self) -> JobModel:
        return self.state.job(self.job_name)

    def compose(self) -> ComposeResult:
        yield ConnectionBar()
        yield JobHeader()
        with TabbedContent(initial=self._initial_tab):
            with TabPane("1 Curves", id="curves"):
                yield LineChart("loss", empty="no loss reported yet", id="loss-chart")
                yield LineChart("learning rate", empty="no learning rate reported", id="lr-chart")
                yield GpuStrip(id="job-gpus")
            with TabPane("2 Checkpoints", id="checkpoints"):
                yield CheckpointTable()
            with TabPane("3 Events", id="events"):
                yield EventTimeline()
            with TabPane("4 Log", id="log"):
                yield LogView()
        yield KeyFooter()

    def current_job(self) -> str | None:
        return self.job_name

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tab = event.pane.id or ""
        self._draw_tab(tab)
        if tab == "log":
            self.query_one(LogView).log_widget.focus()
        elif tab == "events":
            self.query_one(EventTimeline).focus()
        if tab == "checkpoints":
            self._reload(self.job_name, ("checkpoints",))

    # drawing -------------------------------------------------------------------
    def sync_all(self) -> None:
        self._stale_tabs = set(TABS)
        self._draw_header()
        self._draw_tab(self.active_tab)

    def sync(self, change: Change) -> None:
        name = self.job_name
        if change.connection or change.jobs:
            self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        if name in change.jobs or name in change.detail:
            self._draw_header()
        if name in change.series or change.gpus:
            self._stale_tabs.add("curves")
        if name in change.detail:
            self._stale_tabs.add("checkpoints")
        if name in change.events:
            self._stale_tabs.add("events")
        if name in change.logs:
            self._stale_tabs.add("log")
        ckpt = as_int(self.job.progress.get("last_checkpoint_step"))
        if ckpt != self._last_ckpt_step or (change.refetch and name in change.events):
            self._last_ckpt_step = ckpt
            self._reload(name, ("checkpoints",))
        self._draw_tab(self.active_tab)

    def tick(self) -> None:
        self._draw_header()

    def _draw_header(self) -> None:
        self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        self.query_one(JobHeader).show(self.job, self.clock())

    def redraw_now(self) -> None:
        """Draw the active tab at once, throttle or not (a load just completed)."""
        self._drawn_at.clear()
        self._draw_header()
        self._draw_tab(self.active_tab)

    def _draw_tab(self, tab: str) -> None:
        if tab not in self._stale_tabs:
            return
        # A curve gains nothing from more than two redraws a second, a streaming
        # log nothing from more than four (Textual relayouts a growing log).
        interval = MIN_REDRAW_INTERVAL_S.get(tab, 0.0)
        wait = interval - (time.monotonic() - self._drawn_at.get(tab, 0.0))
        if wait > 0:
            if tab not in self._redraw_timers:
                self._redraw_timers[tab] = self.set_timer(wait, lambda: self._draw_later(tab))
            return
        self._drawn_at[tab] = time.monotonic()
        self._stale_tabs.discard(tab)
        job = self.job
        if tab == "curves":
            loss_chart = self.query_one("#loss-chart", LineChart)
            loss_chart.title = f"loss ({job.series_note})" if job.series_note else "loss"
            loss_chart.set_series(
                [
                    ChartSeries("train", list(job.loss), style="bold cyan"),
                    ChartSeries("eval", list(job.eval_loss), style="bold magenta", marker="×"),
                ]
            )
            lr_chart = self.query_one("#lr-chart", LineChart)
            lr_chart.set_series([ChartSeries("lr", list(job.lr), style="green")])
            lr_chart.styles.height = 5 if len(job.lr) else 2  # a note, not an empty box
            self._draw_gpus()
        elif tab == "checkpoints":
            rows, note = job.checkpoint_rows()
            self.query_one(CheckpointTable).show(rows, note, self.clock())
        elif tab == "events":
            self.query_one(EventTimeline).show(list(job.events))
        elif tab == "log":
            self.query_one(LogView).show(job.log)

    def _draw_later(self, tab: str) -> None:
        self._redraw_timers.pop(tab, None)
        if self.active_tab == tab:
            self._draw_tab(tab)

    def _draw_gpus(self) -> None:
        job, gpus = self.job, self.state.gpus
        devices = job.gpu_devices()
        tagged = [g for g in gpus.gpus if isinstance(g.get("jobs"), list) and job.name in g["jobs"]]
        if tagged:
            only: list[int] | None = [as_int(g.get("index")) or 0 for g in tagged]
            note = ""
        elif devices is not None:
            only, note = devices, ""
        else:
            only = None
            note = "all GPUs (the daemon does not say which ones this job uses)"
        self.query_one("#job-gpus", GpuStrip).show(gpus, only, note if gpus.gpus else "")
