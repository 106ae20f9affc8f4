"""`ftsup demo`: a supervised LoRA run on a tiny model built here, crashed once on purpose.

It does what a user would do, through the daemon: build the job, `ftsup start`
it, watch it, kill the trainer with SIGKILL midway (`ftsup signal JOB KILL`),
watch ftsup resume it from its newest valid checkpoint, and at the end ask the
fine-tuned model a few questions. Needs the `train` extra (torch, transformers,
peft); the daemon itself never imports them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, layout_from, report_request_error
from ftsup.supervisor.client import Client, DaemonUnavailable, ensure_daemon
from ftsup.supervisor.protocol import RequestError
from ftsup.supervisor.store import TERMINAL_STATES

DEMO_JOB = "ftsup-demo"
NARRATED = (
    "memory_resume",
    "attempt_started",
    "standby_ready",
    "standby_lost",
    "attempt_exited",
    "restart",
    "quarantine",
    "finished",
    "gave_up",
    "failed",
    "hung",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="a supervised LoRA fine-tune of a tiny local model, crashed once on purpose"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the model, data and checkpoints go (default: STATE_DIR/demo)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1200)")
    p.add_argument("--no-crash", action="store_true", help="do not kill the trainer midway")
    p.add_argument(
        "--queue",
        action="store_true",
        help="instead: four small runs share two simulated GPUs (queue, priority, preemption)",
    )
    add_common(p)
    p.set_defaults(func=cmd_demo)


def _quiet_libraries() -> None:
    """The demo prints its own story; the libraries' progress bars and notices would bury it."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    output.libraries_log_to_stderr()


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    try:
        from ftsup.trainer import demo
    except ImportError as exc:
        output.error(
            f"the demo needs the built-in trainer's packages ({exc.name} is missing)",
            hint="pip install 'ftsup[train]'",
        )
        return output.EXIT_FAILED
    say = _Narrator(quiet=args.json)
    if args.queue:
        from ftsup.supervisor.cli.demo_queue import run_queue_demo

        return run_queue_demo(args, demo, say)
    layout = layout_from(args)
    workdir = (args.workdir or layout.state_dir / "demo").absolute()
    steps = args.steps or demo.DEMO_STEPS
    say.line(f"building a tiny Llama model, its tokenizer and an arithmetic data set in {workdir}")
    job_file = demo.prepare_demo(workdir, steps=steps, name=DEMO_JOB)
    try:
        client, started = ensure_daemon(layout)
    except DaemonUnavailable as exc:
        output.error(str(exc))
        return output.EXIT_NO_DAEMON
    with client:
        if started is not None:
            say.line(f"started the ftsup daemon (pid {started}); its log: {layout.daemon_log}")
        try:
            _clear_previous_run(client, workdir)
            newest = client.request("events", job=None, limit=1)["events"]
            since = newest[-1]["id"] if newest else 0
            client.request("start", spec_path=str(job_file), spec_text=job_file.read_text())
        except RequestError as exc:
            return report_request_error(args, exc)
        say.line(
            f"submitted {job_file}; watch it with `ftsup status {DEMO_JOB}`, "
            f"`ftsup logs -f {DEMO_JOB}` or `ftsup tui`"
        )
        crash_at = None if args.no_crash else steps // 3
        job = _follow(client, steps, crash_at, say, since)
    answers = _answers(demo, workdir, job, say)
    summary = _summary(job, answers, workdir)
    if args.json:
        output.print_json(summary)
    else:
        _print_summary(summary)
    return output.EXIT_OK if job["state"] == "finished" else output.EXIT_FAILED


def _clear_previous_run(client: Client, workdir: Path) -> None:
    """A second `ftsup demo` starts over: the old checkpoints would make it a no-op."""
    try:
        job = client.request("status", job=DEMO_JOB)
    except RequestError:
        job = None
    if job is not None and job["state"] not in TERMINAL_STATES:
        raise RequestError(
            "job_exists",
            f"the demo job is still {job['state']}; stop it with `ftsup stop {DEMO_JOB}` first",
        )
    output_dir = workdir / "output"
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)


class _Narrator:
    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Progress | None = None

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False)
        else:
            output.stdout.print(text, markup=False)


def _current_step(job: dict[str, Any]) -> int:
    """The step of the running attempt (not a line left by an earlier demo run)."""
    progress, attempt = job.get("progress") or {}, job.get("current_attempt")
    if attempt is None or (progress.get("last_update") or 0) < attempt["started_at"]:
        return int(attempt["start_step"]) if attempt else 0
    return int(progress.get("step") or 0)


def _follow(
    client: Client, steps: int, crash_at: int | None, say: _Narrator, since: int
) -> dict[str, Any]:
    """Poll the daemon (as `ftsup status` does), narrate events, crash once, until the end."""
    seen_event = since
    crashed = False
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=output.stdout,
        disable=say.quiet,
        transient=False,
    )
    with progress:
        say.progress = progress
        task = progress.add_task("training", total=steps, loss="")
        while True:
            job = client.request("status", job=DEMO_JOB)
            step = _current_step(job) if job["state"] not in TERMINAL_STATES else steps
            loss = (job.get("progress") or {}).get("loss")
            progress.update(task, completed=step, loss=f"loss {loss:.3f}" if loss else "")
            events = client.request("events", job=DEMO_JOB, after_id=seen_event, limit=100)
            for event in events["events"]:
                seen_event = max(seen_event, event["id"])
                if event["kind"] in NARRATED:
                    say.line(f"  {event['kind']}: {event['message']}")
            if crash_at is not None and not crashed and step >= crash_at and job["current_attempt"]:
                say.line(
                    f"  demo: killing the trainer with SIGKILL at step {step} "
                    "(a crash; ftsup should resume from the newest memory snapshot or checkpoint)"
                )
                try:
                    client.request("signal", job=DEMO_JOB, signal="KILL")
                    crashed = True
                except RequestError:
                    pass  # between attempts; try again on the next poll
            if job["state"] in TERMINAL_STATES:
                say.progress = None
                return job
            time.sleep(0.25)


def _answers(
    demo: Any, workdir: Path, job: dict[str, Any], say: _Narrator
) -> list[tuple[str, str]]:
    output_dir = workdir / "output"
    checkpoints = sorted(
        output_dir.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]) if p.name[11:].isdigit() else -1,
    )
    if job["state"] != "finished" or not checkpoints:
        return []
    say.line("asking the fine-tuned model (newest checkpoint) a few questions ...")
    return list(demo.sample_answers(workdir / "model", checkpoints[-1]))


def _summary(job: dict[str, Any], answers: list[tuple[str, str]], workdir: Path) -> dict[str, Any]:
    history = job.get("attempt_history") or []
    return {
        "job": DEMO_JOB,
        "state": job["state"],
        "reason": job.get("reason"),
        "steps": (job.get("progress") or {}).get("step"),
        "final_loss": (job.get("progress") or {}).get("loss"),
        "attempts": len(history),
        "restarts": job.get("restarts"),
        "resumed_from": [a["resume_from"] for a in history if a.get("resume_from")],
        "answers": [{"prompt": p, "answer": a} for p, a in answers],
        "workdir": str(workdir),
    }


def _loss_text(loss: object) -> str:
    return f"{loss:.4g}" if isinstance(loss, float) else str(loss)


def _print_summary(summary: dict[str, Any]) -> None:
    out = output.stdout
    ok = summary["state"] == "finished"
    out.print(
        f"\n[bold]{'finished' if ok else summary['state']}[/]: {summary['steps']} steps, "
        f"{summary['attempts']} attempts ({summary['restarts']} restart after a crash), "
        f"final loss {_loss_text(summary['final_loss'])}"
    )
    for path in summary["resumed_from"]:
        out.print(f"  resumed from {path}", markup=False)
    for item in summary["answers"]:
        out.print(f"  Q: {item['prompt']:<16} A: {item['answer']}", markup=False)
    if not ok:
        out.print(f"  reason: {summary['reason']}", markup=False)
    out.print(f"[dim]see `ftsup events {DEMO_JOB}`; files in {summary['workdir']}[/]")
