"""Two lines under the jobs table about the highlighted job, in full.

At 80 columns the table has no room for a crash reason; this is where the
state's reason and the newest event are spelled out.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from ftsup.tui import format as fmt
from ftsup.tui.model import JobModel, as_float, as_int
from ftsup.tui.widgets.state_text import event_kind_text, state_text


def brief_text(job: JobModel | None, now: float) -> Text:
    if job is None:
        return Text("no jobs yet: press n to start one from a job file", style="dim")
    text = Text()
    text.append(job.name, style="bold")
    text.append(" ")
    text.append_text(state_text(job.state))
    if job.reason:
        text.append(f": {job.reason}")
    text.append("\n")
    current = job.info.get("current_attempt")
    if isinstance(current, dict):
        n = as_int(current.get("n"))
        text.append(f"attempt {n}")
        resume = current.get("resume_from")
        text.append(f" from {Path(str(resume)).name}" if resume else " from scratch")
        text.append(" · ")
    updated = as_float(job.progress.get("last_update"))
    if updated is not None:
        text.append(f"progress {fmt.age(updated, now)} ago · ")
    last = job.last_event
    if last is not None:
        text.append(fmt.clock_time(as_float(last.get("ts"))) + " ", style="dim")
        text.append_text(event_kind_text(str(last.get("kind", ""))))
        text.append(" " + str(last.get("message", "")))
    return text


class JobBrief(Static):
    DEFAULT_CSS = """
    JobBrief {
        height: 2;
        padding: 0 1;
        background: $boost;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: Text | None = None

    def show(self, job: JobModel | None, now: float) -> None:
        text = brief_text(job, now)
        if text != self._shown:  # most progress events change nothing here: no repaint
            self._shown = text
            self.update(text, layout=False)  # fixed height: no relayout
