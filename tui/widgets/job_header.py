"""The job screen's top lines: state, attempt, step, loss, rate, ETA, restarts,
checkpoint; then where the wall time went (goodput), the checkpoint interval
advice and the warm standby."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        text.append(f" · checkpoint {ckpt_step} ({ckpt_age} ago)")
    goodput_line = goodput_text(job.info)
    if goodput_line.plain:
        text.append("\n")
        text.append_text(goodput_line)
    nodes_line = nodes_text(job.info, now)
    if nodes_line.plain:
        text.append("\n")
        text.append_text(nodes_line)
    return text


def nodes_text(info: dict[str, Any], now: float) -> Text:
    """A multi-node job: `waiting for nodes: ...` and every node's part, as the
    nodes' daemons last wrote it into the shared folder (`ftsup status` too)."""
    text = Text()
    waiting = info.get("waiting_for_nodes")
    if isinstance(waiting, str):
        text.append(waiting, style="yellow")
    view = info.get("nodes")
    nodes = view.get("nodes") if isinstance(view, dict) else None
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        text.append(" · " if text.plain else "nodes: ")
        text.append(str(node.get("node")), style="bold" if node.get("self") else "")
        text.append(" ")
        text.append_text(state_text(str(node.get("state"))))
        step = as_int(node.get("step"))
        text.append(f" step {step if step is not None else '-'}")
        age = as_float(node.get("age_s"))
        if age is not None and age >= 60:
            text.append(f" ({fmt.duration(age)} ago)", style="dim")
    return text


def goodput_text(info: dict[str, Any]) -> Text:
    """`goodput 87% of 2m · stall 1s · downtime 11s · redo 7s · advice: checkpoint
    every 11 steps (now 20) · standby ready`: the parts of the job's wall time, as in
    `ftsup status`."""
    text = Text()
    goodput = info.get("goodput")
    share = as_float(goodput.get("goodput")) if isinstance(goodput, dict) else None
    unknown = goodput.get("unknown") if isinstance(goodput, dict) else None
    if isinstance(goodput, dict) and share is None and isinstance(unknown, str):
        text.append("goodput unknown", style="bold")
        wall = fmt.duration(as_float(goodput.get("wall_s")))
        text.append(f" over {wall} ({unknown})", style="dim")
    if isinstance(goodput, dict) and share is not None:
        text.append(f"goodput {share * 100:.0f}%", style="bold")
        text.append(f" of {fmt.duration(as_float(goodput.get('wall_s')))}")
        for label, key in (
            ("stall", "checkpoint_stall_s"),
            ("downtime", "restart_downtime_s"),
            ("redo", "recomputed_s"),
        ):
            text.append(f" · {label} {fmt.duration(as_float(goodput.get(key)))}")
        advice = goodput.get("checkpoint_advice")
        steps = as_int(advice.get("recommended_steps")) if isinstance(advice, dict) else None
        if isinstance(advice, dict) and steps is not None:
            configured = as_int(advice.get("configured_steps"))
            text.append(f" · advice: checkpoint every {steps} steps")
            text.append(f" (now {configured})" if configured else "", style="dim")
    standby = info.get("standby")
    if isinstance(standby, dict):
        text.append(" · " if text.plain else "")
        text.append(f"standby {standby.get('state')}", style="green")
    return text


class JobHeader(Static):
    DEFAULT_CSS = """
    JobHeader { height: auto; max-height: 3; padding: 0 1; background: $boost; text-wrap: nowrap;
                text-overflow: ellipsis; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._shown: Text | None = None

    def show(self, job: JobModel, now: float) -> None:
        text = header_text(job, now)
        if text == self._shown:
            return
        lines = text.plain.count("\n")
        relayout = self._shown is None or lines != self._shown.plain.count("\n")
        self._shown = text
        self.update(text, layout=relayout)  # relayout only when the line count changes
