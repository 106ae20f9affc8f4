"""Job commands: start, status, ls, stop, restart, logs, events, checkpoint, signal."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.cli import output, render
from ftsup.supervisor.cli.check_cmd import print_warnings
from ftsup.supervisor.cli.common import (
    add_common,
    layout_from,
    report_request_error,
    report_unavailable,
    run_request,
)
from ftsup.supervisor.client import Client, DaemonUnavailable, ensure_daemon
from ftsup.supervisor.protocol import RequestError
from ftsup.supervisor.spec import SpecError, load_spec, with_after
from ftsup.supervisor.store import TERMINAL_STATES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("start", help="submit a job file to the daemon (starts one if needed)")
    p.add_argument("job_file", type=Path)
    p.add_argument(
        "--accept-drift",
        action="store_true",
        help="resume even if the batch size, world size, ... changed",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait until the job ends; exit 0 only if it finished"
    )
    p.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="JOB",
        help="start only once JOB has finished (repeatable; as [job] after in the file)",
    )
    add_common(p)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("status", help="one job in detail, or all jobs")
    p.add_argument("job", nargs="?")
    add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("queue", help="the GPU queue: who holds which GPUs, who waits and why")
    add_common(p)
    p.set_defaults(func=lambda a: run_request(a, lambda c: c.request("queue"), render.print_queue))

    p = sub.add_parser(
        "priority",
        help="change a job's priority in the GPU queue (higher starts first)",
        description=(
            "Set [job] priority of JOB to N (-1000..1000). The stored job file is changed, "
            "so the new priority outlives a daemon restart; the queue decides again at once "
            "(a waiting job may start, or preempt a preemptible one)."
        ),
    )
    p.add_argument("job")
    p.add_argument("priority", type=int, metavar="N")
    add_common(p)
    p.set_defaults(func=cmd_priority)

    p = sub.add_parser("ls", help="list jobs")
    add_common(p)
    p.set_defaults(func=lambda a: run_request(a, lambda c: c.request("list"), render.print_jobs))

    p = sub.add_parser("stop", help="stop a job: SIGTERM (the trainer saves), then SIGKILL")
    p.add_argument("job")
    p.add_argument("--now", action="store_true", help="SIGKILL the process group at once")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    add_common(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("restart", help="restart a job now (graceful stop, then resume)")
    p.add_argument("job")
    add_common(p)
    p.set_defaults(
        func=lambda a: run_request(a, lambda c: c.request("restart", job=a.job), render.print_job)
    )

    p = sub.add_parser("logs", help="the trainer's output")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--attempt", type=int, default=None, help="attempt number (default: last)")
    p.add_argument("-n", "--lines", type=int, default=100)
    add_common(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("events", help="what happened: starts, exits, restarts, checkpoints")
    p.add_argument("job", nargs="?")
    p.add_argument("-n", "--limit", type=int, default=50)
    p.add_argument("-f", "--follow", action="store_true")
    add_common(p)
    p.set_defaults(func=cmd_events)

    for name, help_text in (
        ("save", "ask the trainer to save a checkpoint now (SIGUSR2), and train on"),
        ("checkpoint", "old name of `ftsup save` (deprecated)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job")
        add_common(p)
        p.set_defaults(func=cmd_save, deprecated_name=name if name != "save" else None)

    p = sub.add_parser(
        "signal", help="send a signal to the trainer's process group (e.g. KILL to test recovery)"
    )
    p.add_argument("job")
    p.add_argument("signal", help="name, e.g. KILL, TERM, USR2")
    add_common(p)
    p.set_defaults(
        func=lambda a: run_request(
            a,
            lambda c: c.request("signal", job=a.job, signal=a.signal),
            lambda r: output.stdout.print(f"sent {r['sent']} to {a.job}"),
        )
    )

    p = sub.add_parser("shutdown", help="stop the daemon; running jobs keep running")
    add_common(p)
    p.set_defaults(
        func=lambda a: run_request(
            a,
            lambda c: c.request("shutdown"),
            lambda r: output.stdout.print("daemon shutting down; runs keep running"),
        )
    )


def cmd_start(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.job_file)
        if args.after:
            spec = with_after(spec, args.after)
    except SpecError as exc:
        if args.json:
            output.print_json({"ok": False, "error": {"code": "invalid_spec", "message": str(exc)}})
        else:
            output.error(f"{args.job_file} is not a valid job:\n{exc}")
        return output.EXIT_BAD_INPUT
    print_warnings(spec)  # on stderr, so --json output stays one document
    layout = layout_from(args)
    try:
        client, started_pid = ensure_daemon(layout)
    except DaemonUnavailable as exc:
        return report_unavailable(args, exc)
    with client:
        if started_pid is not None and not args.json:
            output.stderr.print(
                f"started the ftsup daemon (pid {started_pid}); its log: {layout.daemon_log}"
            )
        try:
            job = client.request(
                "start",
                spec_path=str(spec.source.absolute()),
                spec_text=spec.text,
                accept_drift=args.accept_drift,
            )
        except RequestError as exc:
            return report_request_error(args, exc)
        if not args.wait:
            _report_started(args, job)
            return output.EXIT_OK
        if not args.json:
            output.stdout.print(f"job [bold]{spec.name}[/] submitted; waiting for it to end")
        job = _wait_terminal(client, spec.name)
    if args.json:
        output.print_json(job)
    else:
        render.print_job(job)
    return output.EXIT_OK if job["state"] == "finished" else output.EXIT_FAILED


def _report_started(args: argparse.Namespace, job: dict[str, Any]) -> None:
    if args.json:
        output.print_json(job)
        return
    name = job["name"]
    output.stdout.print(
        f"job [bold]{name}[/] submitted ({job['kind']}); output in {job['output_dir']}"
    )
    output.stdout.print(f"  watch it:  ftsup status {name}   ftsup logs -f {name}   ftsup tui")


def _wait_terminal(client: Client, name: str, poll: float = 0.5) -> dict[str, Any]:
    while True:
        job = client.request("status", job=name)
        if job["state"] in TERMINAL_STATES:
            return job
        time.sleep(poll)


def cmd_status(args: argparse.Namespace) -> int:
    if args.job:
        return run_request(args, lambda c: c.request("status", job=args.job), render.print_job)
    return run_request(args, lambda c: c.request("status"), render.print_jobs)


def cmd_stop(args: argparse.Namespace) -> int:
    def action(client: Client) -> dict[str, Any]:
        job = client.request("stop", job=args.job, now=args.now)
        return _wait_terminal(client, args.job) if args.wait else job

    return run_request(args, action, render.print_job)


def cmd_priority(args: argparse.Namespace) -> int:
    def show(job: dict[str, Any]) -> None:
        output.stdout.print(f"{args.job}: priority {args.priority}", markup=False)
        render.print_job(job)

    return run_request(
        args, lambda c: c.request("priority", job=args.job, priority=args.priority), show
    )


def cmd_save(args: argparse.Namespace) -> int:
    if args.deprecated_name:
        output.stderr.print(
            f"[bold yellow]warning:[/] `ftsup {args.deprecated_name}` is now `ftsup save`; "
            "the old name will go away"
        )
    return run_request(
        args,
        lambda c: c.request("save", job=args.job),
        lambda r: output.stdout.print(f"asked {args.job} to save a checkpoint"),
    )


def cmd_logs(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    try:
        with Client(layout.socket) as client:
            result = client.request("logs", job=args.job, attempt=args.attempt, lines=args.lines)
            if args.json and not args.follow:
                output.print_json(result)
                return output.EXIT_OK
            for line in result["lines"]:
                _emit_line(args, line, result["attempt"])
            if not args.follow:
                return output.EXIT_OK
            for event in client.events(jobs=[args.job], kinds=["log", "attempt_started"]):
                if event["kind"] == "attempt_started" and not args.json:
                    output.stderr.print(f"[dim]-- {event['message']} --[/]")
                for line in event.get("data", {}).get("lines", []):
                    _emit_line(args, line, event["data"].get("attempt"))
    except DaemonUnavailable as exc:
        return report_unavailable(args, exc)
    except RequestError as exc:
        return report_request_error(args, exc)
    return output.EXIT_OK


def _emit_line(args: argparse.Namespace, line: str, attempt: int | None) -> None:
    if args.json:
        import json

        sys.stdout.write(json.dumps({"attempt": attempt, "line": line}) + "\n")
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_events(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    try:
        with Client(layout.socket) as client:
            result = client.request("events", job=args.job, limit=args.limit)
            if args.json and not args.follow:
                output.print_json(result)
                return output.EXIT_OK
            render.print_events(result["events"])
            if args.follow:
                skip = {"progress", "log", "gpu"}
                for event in client.events(jobs=[args.job] if args.job else None):
                    if event["kind"] not in skip:
                        render.print_events([event])
    except DaemonUnavailable as exc:
        return report_unavailable(args, exc)
    except RequestError as exc:
        return report_request_error(args, exc)
    return output.EXIT_OK
