"""`ftsup check JOB.toml`: validate a job file without starting anything.

Users run it before `ftsup start` (and scripts in CI with `--json`), so it
reports every problem at once and exits 2 when the file would be refused.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rich.table import Table
from rich.text import Text

from ftsup.supervisor.cli import output
from ftsup.supervisor.durations import format_duration
from ftsup.supervisor.memory_tier import memory_dir_warning
from ftsup.supervisor.spec import SpecError, load_spec, spec_to_json
from ftsup.supervisor.spec_types import (
    CommandSection,
    JobSpec,
    RestartSection,
    SpecIssue,
    TrainSection,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup check`."""
    parser = subparsers.add_parser(
        "check",
        help="validate a job file without starting anything",
        description="Validate a job file and summarise it. Exit 0 when valid, 2 when not.",
    )
    parser.add_argument("job_file", metavar="JOB.toml", type=Path, help="the job file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate `args.job_file`; print a summary or every issue."""
    try:
        spec = load_spec(args.job_file)
    except SpecError as err:
        _report_invalid(err, args.job_file, as_json=args.json)
        return output.EXIT_BAD_INPUT
    if args.json:
        warnings = [warning.to_json() for warning in all_warnings(spec)]
        output.print_json(
            {"ok": True, "job": spec_to_json(spec), "issues": [], "warnings": warnings}
        )
    else:
        print_warnings(spec)
        _print_summary(spec)
    return output.EXIT_OK


def _report_invalid(err: SpecError, path: Path, *, as_json: bool) -> None:
    if as_json:
        issues = [issue.to_json() for issue in err.issues]
        output.print_json({"ok": False, "job": None, "issues": issues, "warnings": []})
        return
    print_issues(err)
    count = len(err.issues)
    output.stderr.print(
        Text(f"{path}: {count} problem{'s' if count != 1 else ''}; nothing was started")
    )


def print_issues(err: SpecError) -> None:
    """Each issue on stderr with its hint; escaped, since `[restart]` is rich markup."""
    for issue in err.issues:
        output.error(issue.render(hint=False), hint=issue.hint)


def all_warnings(spec: JobSpec) -> tuple[SpecIssue, ...]:
    """The job file's own warnings, then those about this host (the CLI runs on the
    daemon's host: the socket is local)."""
    on_host = memory_dir_warning(spec)
    return spec.warnings if on_host is None else (*spec.warnings, on_host)


def print_warnings(spec: JobSpec) -> None:
    """What a valid job file should still change (a deprecated key, settings that
    contradict each other, a memory folder on a disk), on stderr: `ftsup check` and
    `ftsup start` alike."""
    for warning in all_warnings(spec):
        output.stderr.print("[bold yellow]warning:[/] ", end="")
        output.stderr.print(warning.render(hint=False), markup=False)
        if warning.hint:
            output.stderr.print("[dim]hint:[/] ", end="")
            output.stderr.print(warning.hint, markup=False)


def _print_summary(spec: JobSpec) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for label, value in _summary_rows(spec):
        grid.add_row(label, Text(value))
    output.stdout.print(Text.assemble(("ok ", "bold green"), f"{spec.source} is a valid job"))
    output.stdout.print(grid)


def _summary_rows(spec: JobSpec) -> list[tuple[str, str]]:
    rows = [("name", spec.name), ("output_dir", str(spec.output_dir))]
    if spec.command is not None:
        rows += _command_rows(spec.command)
    if spec.train is not None:
        rows += _train_rows(spec.train)
    if spec.launch.distributed:
        launch = spec.launch
        nodes = f"{launch.nnodes} node(s)"
        if launch.elastic_nodes:
            nodes += f", going on with {launch.min_nodes} or more"
        rows.append(("launch", f"torchrun, {launch.nproc_per_node} x {nodes}"))
    rows.append(("restart", _restart_policy(spec.restart)))
    return rows


def _command_rows(command: CommandSection) -> list[tuple[str, str]]:
    resume = shlex.join(command.resume_args) if command.resume_args else "(none)"
    return [
        ("kind", "command"),
        ("argv", shlex.join(command.argv)),
        ("cwd", str(command.cwd)),
        ("resume_args", resume),
    ]


def _train_rows(train: TrainSection) -> list[tuple[str, str]]:
    if train.max_steps > 0:
        length = f"{train.max_steps} steps"
    else:
        epochs = train.num_train_epochs
        length = f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    return [
        ("kind", "train (built-in trainer)"),
        ("model", train.model),
        ("dataset", ", ".join(train.dataset)),
        ("training", f"{train.finetuning_type}, {length}"),
    ]


def _restart_policy(restart: RestartSection) -> str:
    return (
        f"up to {restart.max_restarts} restarts, backoff {format_duration(restart.backoff)} "
        f"doubling to {format_duration(restart.backoff_max)}, give up after "
        f"{restart.crash_loop} failures without progress, stop grace "
        f"{format_duration(restart.stop_grace)}"
    )
