"""The job screen's top lines: state, attempt, step, loss, rate, ETA, restarts, checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from ftsup.tui import format as fmt
from ftsup.tui.model import JobModel, as_float, as_int
from ftsup.tui.widgets.state_text import state_text


def header_text(job: JobModel, now: float) -> Text:
    p = job.progress
    text = Text()
    text.append(job.name, style="bold")
    text.append(" ")
    text.append_text(state_text(job.state))
    current = job.info.get("current_attempt")
    if isinstance(current, dict):
        text.append(f" · attempt {as_int(current.get('n'))}")
        resume = current.get("resume_from")
        text.append(f" from {Path(str(resume)).name}" if resume else " from scratch")
    text.append(f" · restarts {job.restarts}")
    if job.reason:
        text.append(f" · {job.reason}", style="dim")
    text.append("\n")
    fraction = job.fraction
    text.append(fmt.bar(fraction, 10) + " " if fraction is not None else "")
    text.append(f"step {fmt.step_of(job.step, job.max_steps)}")
    if fraction is not None:
        text.append(f" ({fraction * 100:.0f}%)")
    text.append(f" · loss {fmt.number(as_float(p.get('loss')))}")
    eval_loss = as_float(p.get("eval_loss"))
    if eval_loss is not None:
        text.append(f" · eval {fmt.number(eval_loss)}")
    lr = as_float(p.get("lr"))
    if lr is not None:
        text.append(f" · lr {fmt.number(lr, 3)}")
    text.append(f" · {fmt.rate(as_float(p.get('steps_per_s')))} st/s")
    if job.live:
        text.append(f" · ETA {fmt.duration(as_float(p.get('eta_s')))}")
    ckpt_step = as_int(p.get("last_checkpoint_step"))
    if ckpt_step is not None:
        ckpt_age = fmt.age(as_float(p.get("last_checkpoint_time")), now)
        text.append(f" · ckpt {ckpt_step} ({ckpt_age} ago)")
    return text


class JobHeader(Static):
    DEFAULT_CSS = """
    JobHeader { height: 2; padding: 0 1; background: $boost; text-wrap: nowrap;
                text-overflow: ellipsis; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._shown: Text | None = None

    def show(self, job: JobModel, now: float) -> None:
        text = header_text(job, now)
        if text != self._shown:
            self._shown = text
            self.update(text, layout=False)  # fixed height: no relayout
