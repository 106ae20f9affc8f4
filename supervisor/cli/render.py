"""Rich views of daemon answers (the `--json` form is the answer itself)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from ftsup.supervisor.cli.output import stdout
from ftsup.supervisor.durations import format_duration
from ftsup.supervisor.instrumentation import describe as describe_instrumentation
from ftsup.supervisor.protocol import STATE_STYLES, JobState


def state_text(state: str) -> str:
    """The state in its colour: the table the TUI uses too (protocol.STATE_STYLES)."""
    return f"[{STATE_STYLES.get(state, 'white')}]{state}[/]"


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def step_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return "-"
    step, max_steps = progress.get("step", 0), progress.get("max_steps")
    if max_steps:
        return f"{step}/{max_steps} ({100 * step / max_steps:.0f}%)"
    return str(step)


WAITING_STATES = (JobState.QUEUED, JobState.BLOCKED, JobState.BACKOFF)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("JOB", "STATE", "GPUS", "STEP", "LOSS", "STEPS/S", "ETA", "RESTARTS", "OUTPUT")
    for column in columns:
        table.add_column(column)
    for job in jobs:
        progress = job.get("progress") or {}
        eta = progress.get("eta_s")
        devices = job.get("gpu_devices")
        table.add_row(
            job["name"],
            state_text(job["state"]),
            ",".join(str(d) for d in devices) if devices else "-",
            step_text(progress),
            _fmt(progress.get("loss")),
            _fmt(progress.get("steps_per_s"), ".3g"),
            format_duration(eta) if eta is not None and job["state"] == "running" else "-",
            str(job.get("restarts", 0)),
            job["output_dir"],
        )
    return table


def print_degraded(result: dict[str, Any]) -> None:
    """A state disk that refuses writes: the daemon supervises from memory meanwhile."""
    if reason := result.get("degraded"):
        stdout.print(
            f"[bold red]daemon degraded:[/] {escape(str(reason))} "
            "(supervising from memory; state is written back when the disk recovers)"
        )


def print_jobs(result: dict[str, Any]) -> None:
    print_degraded(result)
    jobs = result.get("jobs", [])
    if not jobs:
        stdout.print("no jobs; submit one with [bold]ftsup start JOB.toml[/]")
        return
    stdout.print(jobs_table(jobs))
    for job in jobs:  # why the waiting ones wait (the table has no room for a sentence)
        if job["state"] in WAITING_STATES and job.get("reason"):
            stdout.print(f"[dim]{escape(job['name'])}: {escape(job['reason'])}[/]")
        elif job.get("waiting_for_nodes"):
            stdout.print(f"[dim]{escape(job['name'])}: {escape(job['waiting_for_nodes'])}[/]")


def _instrumentation_row(job: dict[str, Any]) -> list[tuple[str, str]]:
    data = job.get("instrumentation")
    return [("instrument", escape(describe_instrumentation(data)))] if data else []


def print_queue(result: dict[str, Any]) -> None:
    """`ftsup queue`: the holders, then the waiting jobs in the order they are considered."""
    holding, waiting = result.get("holding", []), result.get("waiting", [])
    if not holding and not waiting:
        stdout.print("the GPU queue is empty: no job holds or waits for GPUs")
        return
    for entry in holding:
        gpus = ",".join(str(index) for index in entry["gpus"])
        stdout.print(f"[bold]{escape(entry['job'])}[/] holds GPU {gpus}")
    if waiting:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("#", "JOB", "STATE", "PRIORITY", "WANTS", "WHY"):
            table.add_column(column)
        for entry in waiting:
            wants = (
                f"GPU {','.join(map(str, entry['devices']))}"
                if entry.get("devices")
                else f"{entry['count']} GPU{'s' if entry['count'] != 1 else ''}"
                if entry.get("count")
                else "no GPU"
            )
            table.add_row(
                str(entry["position"]),
                escape(entry["job"]),
                state_text(entry["state"]),
                str(entry["priority"]),
                wants,
                escape(entry.get("reason") or "-"),
            )
        stdout.print(table)


def print_job(job: dict[str, Any]) -> None:
    print_degraded(job)
    progress = job.get("progress") or {}
    stdout.print(
        f"[bold]{job['name']}[/]  {state_text(job['state'])}"
        + (f"  [dim]{job['reason']}[/]" if job.get("reason") else "")
    )
    waiting = job.get("waiting_for_nodes")
    rows = [
        ("kind", job["kind"]),
        ("output", job["output_dir"]),
        *([("nodes", f"[yellow]{escape(waiting)}[/]")] if waiting else []),
        *_instrumentation_row(job),
        *_env_row(job),
        ("step", step_text(progress)),
        ("loss", _fmt(progress.get("loss"))),
        ("eval loss", _fmt(progress.get("eval_loss"))),
        ("lr", _fmt(progress.get("lr"), ".3e")),
        ("steps/s", _fmt(progress.get("steps_per_s"), ".3g")),
        ("ETA", format_duration(progress["eta_s"]) if progress.get("eta_s") is not None else "-"),
        ("attempts", f"{job['attempts']} ({_plural(job['restarts'], 'restart')} after failures)"),
    ]
    if progress.get("last_checkpoint_step") is not None:
        age = time.time() - (progress.get("last_checkpoint_time") or time.time())
        rows.append(
            ("checkpoint", f"step {progress['last_checkpoint_step']}, {format_duration(age)} ago")
        )
    memory = progress.get("memory")
    if memory:
        rows.append(("memory", _memory_text(memory)))
    current = job.get("current_attempt")
    if current:
        source = current.get("resume_from") or "scratch"
        rows.append(("attempt", f"#{current['n']} pid {current.get('trainer_pid')} from {source}"))
    standby = job.get("standby")
    if standby:
        warm = f", warm in {standby['ready_s']:.1f}s" if standby.get("ready_s") else ""
        if (standby.get("warm_priority") or {}).get("cpu") == "SCHED_IDLE":
            warm += ", idle priority"
        rows.append(("standby", f"{standby['state']} (pid {standby.get('pid')}{warm})"))
    if job.get("next_start_at"):
        rows.append(("restart in", format_duration(job["next_start_at"] - time.time())))
    goodput = job.get("goodput")
    if goodput and goodput.get("goodput") is None and goodput.get("unknown"):
        wall = format_duration(goodput.get("wall_s") or 0.0)
        rows.append(("goodput", escape(f"unknown over {wall} ({goodput['unknown']})")))
    if goodput and goodput.get("goodput") is not None:
        rows.append(("goodput", _goodput_text(goodput)))
        advice = goodput.get("checkpoint_advice")
        if advice and advice.get("recommended_steps"):
            configured = advice.get("configured_steps")
            rows.append(
                (
                    "advice",
                    f"checkpoint every {advice['recommended_steps']} steps "
                    f"(~{format_duration(advice['recommended_interval_s'])}, Young/Daly)"
                    + (f"; configured every {configured}" if configured else ""),
                )
            )
    last = job.get("last_exit")
    if last:
        rows.append(("last exit", f"#{last['n']}: {last.get('reason')}"))
    for key, value in rows:
        stdout.print(f"  [dim]{key:>10}[/]  {value}")
    _print_nodes(job.get("nodes"))
    tail = job.get("log_tail")
    if tail:
        stdout.print("  [dim]last log lines:[/]")
        for line in tail:
            stdout.print(f"    {line}", markup=False)


def _print_nodes(view: dict[str, Any] | None) -> None:
    """A multi-node job: every node's part, as its daemon last wrote it."""
    if not view:
        return
    if view.get("error"):
        stdout.print(f"  [dim]nodes:[/] [yellow]{escape(view['error'])}[/]")
    nodes = view.get("nodes") or []
    if not nodes:
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("  NODE", "STATE", "STEP", "ATTEMPT", "FAILURES", "UPDATED", "WAITING FOR"):
        table.add_column(column)
    for node in nodes:
        table.add_row(
            "  " + escape(str(node.get("node"))) + (" (this)" if node.get("self") else ""),
            state_text(str(node.get("state"))),
            str(node.get("step") if node.get("step") is not None else "-"),
            str(node.get("attempt") or "-"),
            str(node.get("failures") or 0),
            f"{format_duration(float(node.get('age_s') or 0))} ago",
            escape(str(node.get("waiting_for_nodes") or "-")),
        )
    stdout.print(table)


def _memory_text(memory: dict[str, Any]) -> str:
    """The newest memory-tier snapshot (issue 18), or why the tier turned itself off."""
    if memory.get("error"):
        return f"[yellow]off: {escape(str(memory['error']))}[/]"
    size = float(memory.get("bytes") or 0) / 2**20
    stall = float(memory.get("stall_s") or 0) * 1000
    return f"snapshot of step {memory.get('step')}, {size:.1f} MiB, {stall:.1f} ms stall"


def _env_row(job: dict[str, Any]) -> list[tuple[str, str]]:
    """`[command] env` by name only: the values are often tokens."""
    keys = job.get("env_keys")
    if not keys:
        return []
    return [("env", ", ".join(f"{key}=…" for key in keys))]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _goodput_text(goodput: dict[str, Any]) -> str:
    parts = [
        ("stall", goodput["checkpoint_stall_s"]),
        ("downtime", goodput["restart_downtime_s"]),
        ("recomputed", goodput["recomputed_s"]),
    ]
    details = ", ".join(f"{name} {format_duration(value)}" for name, value in parts)
    return f"{goodput['goodput']:.0%} of {format_duration(goodput['wall_s'])} ({details})"


def print_events(events: list[dict[str, Any]]) -> None:
    for event in events:
        when = dt.datetime.fromtimestamp(event["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        job = event.get("job") or "-"
        stdout.print(f"[dim]{when}[/] {job:<16} [bold]{event['kind']:<16}[/] ", end="")
        stdout.print(event.get("message", ""), markup=False)
