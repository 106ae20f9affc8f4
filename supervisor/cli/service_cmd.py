"""`ftsup service install | status | uninstall`: run the daemon under systemd."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.markup import escape

from ftsup.supervisor.cli import output
from ftsup.supervisor.service.install import (
    Plan,
    StepResult,
    manager_problem,
    plan_install,
    plan_uninstall,
    run_steps,
    status_report,
    write_unit,
)
from ftsup.supervisor.service.units import Scope


def register(subparsers: Any) -> None:
    service = subparsers.add_parser(
        "service", help="run the daemon as a systemd service (start at boot, restart on hang)"
    )
    commands = service.add_subparsers(dest="service_command", metavar="COMMAND", required=True)

    install = commands.add_parser("install", help="write the unit, enable and start it")
    _add_scope(install, "default: --system as root, else --user")
    install.add_argument("--dry-run", action="store_true", help="print the unit and commands only")
    install.add_argument("--no-start", action="store_true", help="enable at boot, do not start now")
    install.add_argument(
        "--linger",
        action="store_true",
        help="user mode: run `loginctl enable-linger` so runs outlive your SSH session",
    )
    install.add_argument("--json", action="store_true", help="machine-readable output")
    install.set_defaults(func=cmd_install)

    status = commands.add_parser("status", help="is the unit installed, current and running")
    _add_scope(status, "default: both")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    uninstall = commands.add_parser(
        "uninstall", help="stop and disable the daemon, remove the unit"
    )
    _add_scope(uninstall, "default: the one that is installed")
    uninstall.add_argument("--dry-run", action="store_true", help="print the commands only")
    uninstall.add_argument("--json", action="store_true", help="machine-readable output")
    uninstall.set_defaults(func=cmd_uninstall)


def _add_scope(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--user", dest="scope", action="store_const", const=Scope.USER, help="your user manager"
    )
    group.add_argument(
        "--system",
        dest="scope",
        action="store_const",
        const=Scope.SYSTEM,
        help=f"the system manager, as the dedicated user ftsup ({default})",
    )


def cmd_install(args: argparse.Namespace) -> int:
    scope: Scope = args.scope or (Scope.SYSTEM if os.geteuid() == 0 else Scope.USER)
    plan = plan_install(scope, start=not args.no_start, linger=args.linger)
    problem = manager_problem(scope)
    report: dict[str, Any] = {**plan.to_json(), "dry_run": args.dry_run, "manager_problem": problem}
    if args.dry_run:
        return _finish(args, report, plan, [], ok=True)
    if scope is Scope.SYSTEM and os.geteuid() != 0:
        output.error(
            f"installing the system unit writes {plan.unit_path} and needs root",
            hint="run it with sudo, or use --user",
        )
        return output.EXIT_FAILED
    results = run_steps(plan.before)
    if not all(result.ok for result in results):
        return _finish(args, report, plan, results, ok=False)
    if plan.changes_file:
        write_unit(plan.unit_path, plan.unit_text or "")
    report["written"] = plan.changes_file
    if problem is not None:
        # The unit is in place for when systemd runs; nothing is started.
        return _finish(args, report, plan, results, ok=args.no_start)
    results += run_steps(plan.after)
    return _finish(args, report, plan, results, ok=all(result.ok for result in results))


def cmd_uninstall(args: argparse.Namespace) -> int:
    scope: Scope | None = args.scope
    if scope is None:
        installed = [s for s in Scope if status_report(s)["installed"]]
        if not installed:
            output.error("no ftsup unit is installed (neither --system nor --user)")
            return output.EXIT_NOT_FOUND
        if len(installed) > 1:
            output.error(
                "both a system and a user unit are installed", hint="pick --system or --user"
            )
            return output.EXIT_BAD_INPUT
        scope = installed[0]
    plan = plan_uninstall(scope)
    problem = manager_problem(scope)
    report: dict[str, Any] = {**plan.to_json(), "dry_run": args.dry_run, "manager_problem": problem}
    if args.dry_run:
        return _finish(args, report, plan, [], ok=True)
    results: list[StepResult] = []
    if problem is None and plan.previous_text is not None:
        results = run_steps(plan.before)
        if not all(result.ok for result in results):
            return _finish(args, report, plan, results, ok=False)
    plan.unit_path.unlink(missing_ok=True)
    report["written"] = plan.previous_text is not None
    if problem is None:
        results += run_steps(plan.after)
    return _finish(args, report, plan, results, ok=all(result.ok for result in results))


def cmd_status(args: argparse.Namespace) -> int:
    scopes = [args.scope] if args.scope else list(Scope)
    reports = [status_report(scope) for scope in scopes]
    found = any(report["installed"] for report in reports)
    if args.json:
        output.print_json({"units": reports})
    else:
        for report in reports:
            _print_status(report)
    return output.EXIT_OK if found else output.EXIT_NOT_FOUND


def _finish(
    args: argparse.Namespace,
    report: dict[str, Any],
    plan: Plan,
    results: list[StepResult],
    *,
    ok: bool,
) -> int:
    report["results"] = [result.to_json() for result in results]
    report["ok"] = ok
    if args.json:
        output.print_json(report)
    else:
        _print_plan(report, plan, results)
    return output.EXIT_OK if ok else output.EXIT_FAILED


def _print_plan(report: dict[str, Any], plan: Plan, results: list[StepResult]) -> None:
    out = output.stdout
    removing = plan.unit_text is None
    if report["dry_run"]:
        for step in plan.before:
            out.print(f"# {step.why}\n{step.shell}", markup=False)
        if removing:
            out.print(f"rm -f {plan.unit_path}", markup=False)
        else:
            out.print(f"# would write {plan.unit_path}:", markup=False)
            out.print(plan.unit_text, markup=False)
        for step in plan.after:
            out.print(f"# {step.why}\n{step.shell}", markup=False)
    for result in results:
        mark = "[green]ok[/]" if result.ok else f"[red]failed ({result.returncode})[/]"
        out.print(f"{mark} {result.step.shell}")
        if not result.ok and result.output:
            out.print(result.output, markup=False)
    if report.get("written"):
        verb = "removed" if removing else "wrote"
        out.print(f"{verb} {plan.unit_path}", markup=False)
    if (problem := report["manager_problem"]) and not report["dry_run"]:
        out.print(f"[yellow]note:[/] {escape(problem)}.")
        out.print("Run these where systemd manages this machine or user:")
        for step in plan.after:
            out.print(f"  {step.shell}", markup=False)
    for note in plan.notes:
        out.print(f"[yellow]note:[/] {escape(note)}")


def _print_status(report: dict[str, Any]) -> None:
    out = output.stdout
    scope = report["scope"]
    if not report["installed"]:
        out.print(f"{scope}: not installed ({report['unit_path']})", markup=False)
        return
    current = "current" if report["current"] else "outdated: `ftsup service install` updates it"
    out.print(f"{scope}: {report['unit_path']} ({current})", markup=False)
    if problem := report["manager_problem"]:
        out.print(f"  {problem}", markup=False)
    if props := report.get("systemd"):
        out.print(
            f"  {props.get('ActiveState', '?')} ({props.get('SubState', '?')}), "
            f"{props.get('UnitFileState', '?')}, pid {props.get('MainPID', '?')}, "
            f"restarts {props.get('NRestarts', '?')}",
            markup=False,
        )
        if props.get("StatusText"):
            out.print(f"  status: {props['StatusText']}", markup=False)
    if report.get("linger") is False:
        out.print("  lingering is off: runs stop when your last session ends", markup=False)
