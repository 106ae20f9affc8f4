"""The GPUs under the daemon (or one job's), one `GpuRow` each, or why there are none.

When the daemon's GPU monitor is off (no NVML, no GPU, an older daemon without
the `gpus` request) the strip is one line that says so instead of an empty box.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from ftsup.tui.model import GpuModel, as_int
from ftsup.tui.widgets.gpu_row import GpuRow


class GpuStrip(Vertical):
    DEFAULT_CSS = """
    GpuStrip { height: auto; max-height: 9; overflow-y: auto; padding: 0 1; }
    GpuStrip > .gpu-note { color: $text-muted; height: 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._indices: list[int] = []

    def compose(self) -> ComposeResult:
        yield Static("", classes="gpu-note")

    def show(self, gpus: GpuModel, only: list[int] | None = None, note: str = "") -> None:
        """Show every GPU, or the ones in `only`; `note` explains a choice made for the reader."""
        entries = (
            [g for g in gpus.gpus if only is None or as_int(g.get("index")) in only]
            if gpus.available
            else []
        )
        indices = [as_int(g.get("index")) or 0 for g in entries]
        note_widget = self.query_one(".gpu-note", Static)
        if not entries:
            text = gpus.status if not gpus.available else "no GPU of this job is monitored"
            note_widget.update(text)
            note_widget.display = True
        else:
            note_widget.update(note)
            note_widget.display = bool(note)
        if indices != self._indices:
            self._indices = indices
            for row in self.query(GpuRow):
                row.remove()
            self.mount_all([GpuRow(i) for i in indices])
            self.call_after_refresh(self._fill, gpus, entries)
        else:
            self._fill(gpus, entries)

    def _fill(self, gpus: GpuModel, entries: list[dict[str, object]]) -> None:
        rows = {row.index: row for row in self.query(GpuRow)}
        for gpu in entries:
            index = as_int(gpu.get("index")) or 0
            row = rows.get(index)
            if row is not None and row.is_mounted:
                row.show(dict(gpu), gpus.series.get(index, {}))
