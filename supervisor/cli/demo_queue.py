"""`ftsup demo --queue`: the GPU queue at work on simulated GPUs, with real training.

A daemon of its own (state and socket under `demo-queue/` beside the user's, so
the user's daemon and jobs are untouched) sees two simulated GPUs
(FTSUP_SIMULATE_GPUS=2). Four small LoRA runs of the demo's tiny model ask for
one GPU each: two run, the third waits in the queue with its reason, and a
fourth with a higher priority preempts the `preemptible` one, which saves, goes
back to the queue and later resumes from that checkpoint. The story is what the
daemon says (`queue`, `status`, events), printed as it happens.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.cli import output, render
from ftsup.supervisor.cli.common import layout_from
from ftsup.supervisor.client import Client, DaemonUnavailable, ensure_daemon
from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import EventKind, RequestError
from ftsup.supervisor.store import TERMINAL_STATES

SIMULATED_GPUS = 2
QUEUE_DEMO_STEPS = 200
NARRATED = (
    EventKind.QUEUED,
    EventKind.PLACED,
    EventKind.PREEMPTED,
    EventKind.ATTEMPT_EXITED,
    EventKind.FINISHED,
    EventKind.GAVE_UP,
    EventKind.FAILED,
)


@dataclass(frozen=True)
class DemoJob:
    name: str
    priority: int = 0
    preemptible: bool = False


FIRST_WAVE = (DemoJob("q-low", preemptible=True), DemoJob("q-mid"), DemoJob("q-later"))
URGENT = DemoJob("q-urgent", priority=10)


def demo_layout(args: argparse.Namespace) -> Layout:
    """A daemon of the demo's own, beside the user's (never the user's daemon)."""
    base = layout_from(args)
    return Layout(base.state_dir / "demo-queue", base.runtime_dir / "demo-queue")


def queue_job_text(template: str, job: DemoJob, output_dir: Path) -> str:
    """The demo's LoRA job file, renamed, with its own output and one GPU from the queue."""
    keys = f'name = "{job.name}"\noutput_dir = "{output_dir}"\npriority = {job.priority}\n'
    keys += f"preemptible = {str(job.preemptible).lower()}\n"
    body = template[template.index("[train]") :]
    title = "# ftsup demo --queue: one of four runs sharing two simulated GPUs\n"
    return f"{title}[job]\n{keys}\n{body}\n[gpu]\ncount = 1\n"


def run_queue_demo(args: argparse.Namespace, demo: Any, say: Any) -> int:
    layout = demo_layout(args)
    workdir = (args.workdir or layout.state_dir / "work").absolute()
    steps = args.steps or QUEUE_DEMO_STEPS
    say.line(f"building a tiny Llama model and an arithmetic data set in {workdir}")
    template = demo.prepare_demo(workdir, steps=steps, name="q-template").read_text()
    files = {}
    for job in (*FIRST_WAVE, URGENT):
        path = workdir / f"{job.name}.toml"
        out = workdir / job.name
        if out.exists():
            import shutil

            shutil.rmtree(out)  # a second demo starts over
        path.write_text(queue_job_text(template, job, out))
        files[job.name] = path
    os.environ[ENV_SIMULATE_GPUS] = str(SIMULATED_GPUS)  # for the daemon started here
    # Its trainers share this machine's cores (a GPU per run is simulated, the
    # compute is not): torch's default of one thread per core in each of them
    # oversubscribes a small machine and every step crawls (measured: 130 s for
    # the demo on 2 cores, 31 s with one thread each).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // SIMULATED_GPUS)))
    try:
        client, started = ensure_daemon(layout)
    except DaemonUnavailable as exc:
        output.error(str(exc))
        return output.EXIT_NO_DAEMON
    with client:
        if not client.request("gpus").get("simulated"):
            output.error(f"the daemon on {layout.socket} does not run on simulated GPUs")
            return output.EXIT_FAILED
        say.line(
            f"a daemon on {SIMULATED_GPUS} simulated GPUs (pid {started or 'already running'}); "
            f"watch it with `ftsup --state-dir {layout.state_dir} --runtime-dir "
            f"{layout.runtime_dir} tui` (the GPU map: g)"
        )
        try:
            summary = _play(client, files, steps, say)
        except RequestError as exc:
            output.error(str(exc))
            return output.EXIT_FAILED
        finally:
            if started is not None:
                client.request("shutdown")
    if args.json:
        output.print_json(summary)
    else:
        _print_summary(summary)
    ok = all(job["state"] == "finished" for job in summary["jobs"])
    return output.EXIT_OK if ok else output.EXIT_FAILED


def _submit(client: Client, path: Path) -> None:
    existing = _status_or_none(client, path.stem)
    if existing is not None and existing["state"] not in TERMINAL_STATES:
        raise RequestError(
            "job_exists", f"{path.stem} is still {existing['state']} from an earlier demo"
        )
    client.request("start", spec_path=str(path), spec_text=path.read_text())


def _status_or_none(client: Client, name: str) -> dict[str, Any] | None:
    try:
        return dict(client.request("status", job=name))
    except RequestError:
        return None


def _play(client: Client, files: dict[str, Path], steps: int, say: Any) -> dict[str, Any]:
    newest = client.request("events", job=None, limit=1)["events"]
    seen = newest[-1]["id"] if newest else 0
    for job in FIRST_WAVE:
        _submit(client, files[job.name])
        say.line(f"submitted {job.name} (1 GPU{', preemptible' if job.preemptible else ''})")
    low = FIRST_WAVE[0].name
    seen = _until(client, say, seen, lambda: _step(client, low) >= steps // 4)
    say.line("the queue now (`ftsup queue`):")
    _show_queue(client, say)
    _submit(client, files[URGENT.name])
    say.line(f"submitted {URGENT.name} with priority {URGENT.priority}: it outranks {low}")
    seen = _until(client, say, seen, lambda: _state(client, URGENT.name) == "running")
    say.line("the queue now:")
    _show_queue(client, say)
    names = [job.name for job in (*FIRST_WAVE, URGENT)]
    _until(client, say, seen, lambda: all(_terminal(client, name) for name in names))
    return {"jobs": [_job_summary(client, name) for name in names], "steps": steps}


def _step(client: Client, name: str) -> int:
    status = _status_or_none(client, name) or {}
    return int((status.get("progress") or {}).get("step") or 0)


def _state(client: Client, name: str) -> str | None:
    status = _status_or_none(client, name)
    return None if status is None else str(status["state"])


def _terminal(client: Client, name: str) -> bool:
    return _state(client, name) in TERMINAL_STATES


def _until(
    client: Client, say: Any, seen: int, done: Callable[[], bool], timeout: float = 1800
) -> int:
    """Narrate the queue's events until `done()`; returns the last event id seen."""
    deadline = time.monotonic() + timeout
    while True:
        for event in client.request("events", job=None, after_id=seen, limit=200)["events"]:
            seen = max(seen, event["id"])
            if event["kind"] in NARRATED and event.get("job"):
                say.line(f"  {event['job']}: {event['kind']}: {event['message']}")
        if done():
            return seen
        if time.monotonic() > deadline:
            raise RequestError("timeout", "the queue demo did not reach its next stage in time")
        time.sleep(0.5)


def _show_queue(client: Client, say: Any) -> None:
    if not say.quiet:
        render.print_queue(client.request("queue"))


def _job_summary(client: Client, name: str) -> dict[str, Any]:
    status = _status_or_none(client, name) or {"state": "unknown"}
    history = status.get("attempt_history") or []
    events = client.request("events", job=name, limit=500)["events"]
    return {
        "waited": [e["message"] for e in events if e["kind"] == EventKind.QUEUED],
        "preempted": [e["message"] for e in events if e["kind"] == EventKind.PREEMPTED],
        "job": name,
        "state": status["state"],
        "attempts": len(history),
        "steps": (status.get("progress") or {}).get("step"),
        "attempt_steps": [
            {
                "start_step": a.get("start_step"),
                "last_step": a.get("last_step"),
                "resume_from": a.get("resume_from"),
            }
            for a in history
        ],
    }


def _print_summary(summary: dict[str, Any]) -> None:
    out = output.stdout
    out.print("\n[bold]the four runs[/]")
    for job in summary["jobs"]:
        spans = " | ".join(
            f"steps {a['start_step'] + 1}-{a['last_step']}"
            for a in job["attempt_steps"]
            if a["start_step"] is not None and a["last_step"] is not None
        )
        out.print(
            f"  {job['job']:<9} {job['state']:<9} {job['attempts']} attempt(s): {spans}",
            markup=False,
        )
    out.print(
        "[dim]a preempted run resumes at the step it saved when it stopped: no step is "
        "trained twice[/]"
    )
