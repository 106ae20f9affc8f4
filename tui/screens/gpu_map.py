"""`m`: the GPU map and the queue, for a server that several people share.

Which job holds which GPU, each GPU's health and memory, and the jobs waiting
for GPUs in queue order with the daemon's reason. The app keeps the queue
current from events (a job placed, queued, blocked, ended; a GPU fault) and,
while this screen is open, asks again at each GPU poll.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll

from ftsup.tui.model import Change, TuiState
from ftsup.tui.screens.base import StateScreen
from ftsup.tui.widgets.connection_bar import ConnectionBar
from ftsup.tui.widgets.footer import KeyFooter
from ftsup.tui.widgets.gpu_map import GpuMap
from ftsup.tui.widgets.queue_table import QueueTable


class GpuMapScreen(StateScreen):
    DEFAULT_CSS = """
    GpuMapScreen > VerticalScroll { height: 1fr; }
    GpuMapScreen QueueTable { margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, state: TuiState, clock: Callable[[], float]) -> None:
        super().__init__(state, clock)

    def compose(self) -> ComposeResult:
        yield ConnectionBar()
        with VerticalScroll(can_focus=False):
            yield GpuMap(id="gpu-map")
            yield QueueTable(id="queue")
        yield KeyFooter()

    def sync_all(self) -> None:
        self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        self.query_one(GpuMap).show(self.state.gpus, self.state.queue)
        self.query_one(QueueTable).show(self.state.queue)

    def sync(self, change: Change) -> None:
        if change.connection or change.jobs or change.roster:
            self.query_one(ConnectionBar).show(self.state.connection, self.state.counts())
        if change.gpus or change.queue:
            self.query_one(GpuMap).show(self.state.gpus, self.state.queue)
        if change.queue:
            self.query_one(QueueTable).show(self.state.queue)
