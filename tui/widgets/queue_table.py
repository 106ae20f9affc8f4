"""The GPU queue: the waiting jobs in the order placement considers them, each
with its priority, the GPUs it asks for, `queued` or `blocked`, and why it waits.

The reason is the daemon's own sentence (`needs 2 GPUs: 0,1 used by qwen-sft, 3
unhealthy (XID 79)`), never shortened: it is the one thing a person waiting
for a GPU needs to read, so it wraps instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ftsup.tui import format as fmt
from ftsup.tui.model import QueueModel, as_int
from ftsup.tui.widgets.state_text import state_text


def wants_text(entry: dict[str, Any]) -> str:
    """What the job asks for, as `ftsup queue` says it: `GPU 0,1`, `2 GPUs`, `no GPU`."""
    devices = entry.get("devices")
    if isinstance(devices, list) and devices:
        return "GPU " + ",".join(str(d) for d in devices)
    count = as_int(entry.get("count"))
    if count:
        return f"{count} GPU" + ("s" if count != 1 else "")
    return "no GPU"


def queue_table(waiting: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("job", no_wrap=True, max_width=24, overflow="ellipsis")
    table.add_column("state", no_wrap=True)
    table.add_column("prio", justify="right", no_wrap=True)
    table.add_column("wants", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    for entry in waiting:
        position = as_int(entry.get("position"))
        priority = as_int(entry.get("priority"))
        table.add_row(
            str(position) if position is not None else fmt.DASH,
            Text(str(entry.get("job")), style="bold"),
            state_text(str(entry.get("state") or "queued")),
            str(priority) if priority is not None else fmt.DASH,
            wants_text(entry),
            str(entry.get("reason") or fmt.DASH),
        )
    return table


class QueueTable(Static):
    """The waiting jobs, or one line: none wait, or this daemon has no queue."""

    DEFAULT_CSS = """
    QueueTable { height: auto; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._key: object = None

    def show(self, queue: QueueModel) -> None:
        key = (queue.known, queue.note, repr(queue.waiting))
        if key == self._key:
            return  # unchanged: no repaint
        self._key = key
        title = Text("Queue", style="bold underline")
        parts: list[RenderableType] = [title]
        if not queue.known:
            parts.append(Text(f"not known: {queue.note or 'no answer yet'}", style="dim"))
        elif not queue.waiting:
            parts.append(Text("no job waits for a GPU", style="dim"))
        else:
            parts.append(queue_table(queue.waiting))
        self.update(Group(*parts))
