"""The GPU map: one line per GPU saying which job holds it, its health and memory.

Holders come from the daemon's `queue` answer, health and memory from its `gpus`
reading. An older daemon without `queue` still gets its GPUs listed, holders
unknown (and the note says why); a GPU a job holds that the monitor does not
know (no NVML) is listed too, health unknown, so no holding is hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ftsup.tui import format as fmt
from ftsup.tui.model import FOREIGN_LIMIT_MIB, GpuModel, QueueModel, as_float, as_int


@dataclass(frozen=True)
class MapRow:
    """One GPU as the map shows it (plain values: the model tests read them)."""

    index: int
    holder: str | None  # the job holding it; None when none does (or unknown)
    state: str  # the "held by" column: the job, "free", "busy" (others' memory), "–", "?"
    healthy: bool | None  # None: the monitor does not know this GPU
    health: str  # "healthy", "unhealthy: <reason>", "unknown (no GPU monitor)"
    util: float | None
    mem_used: float | None  # bytes
    mem_total: float | None
    foreign_mib: int | None  # None: the daemon does not say
    label: str = ""  # how to name it ("n2:0" with several daemons); "" = its index


def map_rows(gpus: GpuModel, queue: QueueModel) -> list[MapRow]:
    """Every GPU the reading or a holding names, by index."""
    readings: dict[int, dict[str, object]] = {}
    if gpus.available:
        for entry in gpus.gpus:
            index = as_int(entry.get("index"))
            if index is not None:
                readings[index] = entry
    rows: list[MapRow] = []
    for index in sorted(set(readings) | set(queue.holders)):
        gpu = readings.get(index)
        holder = queue.holders.get(index)
        foreign = _foreign(gpu, queue, index)
        if gpu is None:
            healthy, health = None, "unknown (no GPU monitor)"
        elif gpu.get("healthy", True) is False:
            healthy = False
            health = f"unhealthy: {gpu.get('unhealthy_reason') or 'marked by the monitor'}"
        else:
            healthy, health = True, "healthy"
        if holder is not None:
            state = holder
        elif not queue.known:
            state = "?"
        elif foreign is not None and foreign >= queue.foreign_limit_mib:
            state = "busy"
        elif healthy is not False:
            state = "free"
        else:
            state = fmt.DASH  # out of use until `ftsup gpus reset`
        rows.append(
            MapRow(
                index=index,
                holder=holder,
                state=state,
                healthy=healthy,
                health=health,
                util=as_float(gpu.get("util")) if gpu else None,
                mem_used=as_float(gpu.get("mem_used")) if gpu else None,
                mem_total=as_float(gpu.get("mem_total")) if gpu else None,
                foreign_mib=foreign,
                label=str(gpu.get("label", "")) if gpu else "",
            )
        )
    return rows


def _foreign(gpu: dict[str, object] | None, queue: QueueModel, index: int) -> int | None:
    """Other processes' MiB on the GPU: the reading's `foreign_mib`, else the queue's."""
    value = as_int(gpu.get("foreign_mib")) if gpu else None
    return value if value is not None else queue.foreign_mib.get(index)


def _gib(value: float | None) -> str:
    return fmt.DASH if value is None else f"{value / 2**30:.0f}"


def _mib(value: int | None) -> str:
    if value is None:
        return fmt.DASH
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


def map_table(rows: list[MapRow], busy_mib: int = FOREIGN_LIMIT_MIB) -> Table:
    foreign = any(row.foreign_mib is not None for row in rows)
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    table.add_column("GPU", justify="right", no_wrap=True)
    table.add_column("held by", no_wrap=True, max_width=24, overflow="ellipsis")
    table.add_column("util", justify="right", no_wrap=True)
    table.add_column("memory", justify="right", no_wrap=True)
    if foreign:
        table.add_column("others", justify="right", no_wrap=True)
    table.add_column("health", overflow="fold")
    for row in rows:
        if row.holder is not None:
            holder = Text(row.holder, style="bold")
        else:
            style = {"free": "green", "busy": "yellow"}.get(row.state, "dim")
            holder = Text(row.state, style=style)
        util = fmt.DASH if row.util is None else f"{row.util:.0f}%"
        memory = f"{_gib(row.mem_used)}/{_gib(row.mem_total)} GiB"
        health_style = {True: "green", False: "bold red", None: "dim"}[row.healthy]
        cells: list[RenderableType] = [row.label or str(row.index), holder, util, memory]
        if foreign:
            busy = row.foreign_mib is not None and row.foreign_mib >= busy_mib
            cells.append(Text(_mib(row.foreign_mib), style="yellow" if busy else ""))
        cells.append(Text(row.health, style=health_style))
        table.add_row(*cells)
    return table


class GpuMap(Static):
    """The map, or one line saying why there are no GPUs to show."""

    DEFAULT_CSS = """
    GpuMap { height: auto; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[MapRow] = []
        self._key: object = None

    def show(self, gpus: GpuModel, queue: QueueModel) -> None:
        rows = map_rows(gpus, queue)
        notes = []
        if not rows:
            notes.append(gpus.status if not gpus.available else "the GPU monitor sees no GPU")
        if not queue.known and queue.note:
            notes.append(f"holders unknown: {queue.note}")
        key = (rows, notes)
        if key == self._key:
            return  # unchanged: no repaint
        self._key, self.rows = key, rows
        parts: list[RenderableType] = [Text("GPUs", style="bold underline")]
        parts.extend(Text(note, style="dim") for note in notes)
        if rows:
            parts.append(map_table(rows, queue.foreign_limit_mib))
        self.update(Group(*parts))
