"""`ftsup ckpt verify|ls|quarantine|restore`: checkpoint tools that need no daemon.

They work on any folder, so a person can check a checkpoint before pointing a
run at it, see why ftsup quarantined one, and put it back. Exit codes: 0 ok
(verify: every checkpoint valid), 1 some checkpoint invalid, 2 bad input,
4 no such folder, 5 refused (the target name is taken).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ftsup.supervisor.checkpoints.discovery import (
    list_checkpoints,
    manifests_expected,
    validate_all,
)
from ftsup.supervisor.checkpoints.humanize import format_bytes
from ftsup.supervisor.checkpoints.quarantine import (
    list_quarantined,
    quarantine,
    quarantine_reason,
    restore,
)
from ftsup.supervisor.checkpoints.report import CheckpointReport, checkpoint_step
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, ask
from ftsup.supervisor.durations import format_duration


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup ckpt` and its subcommands."""
    parser = subparsers.add_parser(
        "ckpt",
        help="verify, list, quarantine and restore checkpoints (no daemon needed)",
        description="Checkpoint tools that work on any folder, with or without the daemon.",
    )
    commands = parser.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)

    verify = commands.add_parser(
        "verify",
        help="check a checkpoint folder, or every checkpoint of an output folder",
        description="Exit 0 when every checkpoint is valid, 1 when one is not.",
    )
    verify.add_argument("path", type=Path, metavar="PATH", help="checkpoint or output folder")
    verify.add_argument(
        "--deep", action="store_true", help="also verify hashes and every zip CRC (reads all)"
    )
    _add_world_size(verify)
    verify.add_argument("--json", action="store_true", help="print JSON for scripts")
    verify.set_defaults(func=run_verify)

    ls = commands.add_parser(
        "ls",
        help="list the checkpoints of an output folder",
        description="Step, time, size, validity and resumability of each checkpoint.",
    )
    ls.add_argument(
        "output_dir",
        metavar="JOB|OUTPUT_DIR",
        help="a job's name (asks the daemon for its output folder) or the folder",
    )
    _add_world_size(ls)
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_common(ls, json_flag=False)
    ls.set_defaults(func=run_ls)

    quar = commands.add_parser(
        "quarantine",
        help="rename a checkpoint to checkpoint-N.invalid-<reason> (never deletes)",
    )
    quar.add_argument("path", type=Path, metavar="PATH", help="a checkpoint-N folder")
    quar.add_argument("--reason", required=True, help="why (kept in ftsup-quarantine.json)")
    quar.add_argument("--json", action="store_true", help="print JSON for scripts")
    quar.set_defaults(func=run_quarantine)

    rest = commands.add_parser("restore", help="rename a quarantined checkpoint back")
    rest.add_argument("path", type=Path, metavar="PATH", help="a checkpoint-N.invalid-* folder")
    rest.add_argument("--json", action="store_true", help="print JSON for scripts")
    rest.set_defaults(func=run_restore)


def _add_world_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="processes that wrote the checkpoints (default: inferred from their files)",
    )


# -- verify ---------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.is_dir():
        output.error(
            f"{path} is not a folder", hint="give a checkpoint-N folder or an output folder"
        )
        return output.EXIT_NOT_FOUND
    if list_checkpoints(path):
        reports = validate_all(path, deep=args.deep, world_size=args.world_size)
    else:
        siblings = path.parent if checkpoint_step(path) is not None else None
        reports = [
            validate_checkpoint(
                path,
                deep=args.deep,
                world_size=args.world_size,
                require_manifest=bool(siblings and manifests_expected(siblings)),
            )
        ]
    ok = all(r.valid for r in reports)
    if args.json:
        output.print_json({"ok": ok, "checkpoints": [r.to_json() for r in reports]})
    else:
        _print_reports(reports, verbose=len(reports) == 1)
    return output.EXIT_OK if ok else output.EXIT_FAILED


def _print_reports(reports: list[CheckpointReport], *, verbose: bool) -> None:
    if not reports:
        output.stdout.print("no checkpoints")
        return
    output.stdout.print(_table(reports))
    if verbose:
        for problem in reports[0].problems:
            output.stdout.print(Text.assemble(("  problem: ", "red"), problem))
        for note in reports[0].notes:
            output.stdout.print(Text.assemble(("  note: ", "dim"), note))


# -- ls -------------------------------------------------------------------------


def _output_dir_of(args: argparse.Namespace) -> Path | int:
    """The folder itself, or the output folder of the job of that name."""
    out = Path(args.output_dir)
    if out.is_dir() or "/" in args.output_dir:
        return out
    job = ask(args, lambda client: client.request("status", job=args.output_dir))
    return job if isinstance(job, int) else Path(job["output_dir"])


def run_ls(args: argparse.Namespace) -> int:
    found = _output_dir_of(args)
    if isinstance(found, int):
        return found
    out = found
    if not out.is_dir():
        output.error(f"{out} is not a folder")
        return output.EXIT_NOT_FOUND
    reports = validate_all(out, world_size=args.world_size)
    resume = next((r for r in reversed(reports) if r.resumable), None)
    quarantined = [_quarantined_json(p) for p in list_quarantined(out)]
    if args.json:
        output.print_json(
            {
                "output_dir": str(out),
                "checkpoints": [r.to_json() for r in reports],
                "resume_from": str(resume.path) if resume else None,
                "quarantined": quarantined,
            }
        )
        return output.EXIT_OK
    if reports:
        output.stdout.print(_table(reports, resume=resume))
    else:
        output.stdout.print(f"no checkpoints in {out}")
    if quarantined:
        output.stdout.print(_quarantine_table(quarantined))
    return output.EXIT_OK


def _quarantined_json(path: Path) -> dict[str, Any]:
    return {"path": str(path), "step": checkpoint_step(path), "reason": quarantine_reason(path)}


def _table(reports: list[CheckpointReport], *, resume: CheckpointReport | None = None) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("saved", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("status", ratio=1)
    table.add_column("resumable", no_wrap=True)
    now = time.time()
    for report in reports:
        marker = " [bold cyan]← resume[/]" if resume is not None and report is resume else ""
        table.add_row(
            "-" if report.step is None else str(report.step),
            dt.datetime.fromtimestamp(report.mtime).strftime("%Y-%m-%d %H:%M:%S"),
            format_duration(now - report.mtime),
            format_bytes(report.size_bytes),
            report.format,
            _status(report),
            ("[green]yes[/]" if report.resumable else "[yellow]no[/]") + marker,
        )
    return table


def _status(report: CheckpointReport) -> str:
    if not report.valid:
        extra = len(report.problems) - 1
        more = f" (+{extra} more)" if extra > 0 else ""
        return f"[red]invalid:[/] {escape(report.reason or '')}{more}"
    if not report.resumable:
        return f"[yellow]valid, {escape(report.reason or 'not resumable')}[/]"
    return "[green]valid[/]"


def _quarantine_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="quarantined", box=None, pad_edge=False, title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("folder")
    table.add_column("reason")
    for row in rows:
        table.add_row(
            str(row["step"]), escape(Path(row["path"]).name), escape(row["reason"] or "-")
        )
    return table


# -- quarantine / restore ----------------------------------------------------------


def run_quarantine(args: argparse.Namespace) -> int:
    return _rename(args, lambda p: quarantine(p, args.reason), "quarantined")


def run_restore(args: argparse.Namespace) -> int:
    return _rename(args, restore, "restored")


def _rename(args: argparse.Namespace, action: Callable[[Path], Path], verb: str) -> int:
    path: Path = args.path
    try:
        target = action(path)
    except FileNotFoundError as exc:
        output.error(str(exc))
        return output.EXIT_NOT_FOUND
    except FileExistsError as exc:
        output.error(str(exc))
        return output.EXIT_REFUSED
    except ValueError as exc:
        output.error(str(exc))
        return output.EXIT_BAD_INPUT
    except OSError as exc:
        output.error(f"could not rename {path}: {exc}")
        return output.EXIT_FAILED
    if args.json:
        output.print_json({"ok": True, "from": str(path), "to": str(target)})
    else:
        output.stdout.print(Text(f"{verb}: {path} -> {target}"))
    return output.EXIT_OK
