"""`ftsup checkpoints verify|ls|quarantine|restore` (or `ftsup ckpt ...`): checkpoint
tools that need no daemon.

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
from ftsup.supervisor.checkpoints.listing import checkpoint_listing
from ftsup.supervisor.checkpoints.quarantine import (
    quarantine,
    restore,
)
from ftsup.supervisor.checkpoints.report import CheckpointReport, checkpoint_step
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, ask
from ftsup.supervisor.durations import format_duration


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup checkpoints` (alias `ckpt`) and its subcommands."""
    parser = subparsers.add_parser(
        "checkpoints",
        aliases=["ckpt"],
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
        "--deep",
        action="store_true",
        help="also verify checksums (the manifest's algorithm) and every zip CRC (reads all)",
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
    output.stdout.print(_table([r.to_json() for r in reports]))
    if verbose:
        for problem in reports[0].problems:
            output.stdout.print(Text.assemble(("  problem: ", "red"), problem))
        for note in reports[0].notes:
            output.stdout.print(Text.assemble(("  note: ", "dim"), note))


# -- ls -------------------------------------------------------------------------


def _output_dir_of(args: argparse.Namespace) -> tuple[Path, bool | None] | int:
    """The folder itself, or the output folder of the job of that name; with
    whether manifests are required (True for a `[train]` job, as the daemon
    judges it, so that both list the same verdicts)."""
    out = Path(args.output_dir)
    if out.is_dir() or "/" in args.output_dir:
        return out, None
    job = ask(args, lambda client: client.request("status", job=args.output_dir))
    if isinstance(job, int):
        return job
    return Path(job["output_dir"]), True if job.get("kind") == "train" else None


def run_ls(args: argparse.Namespace) -> int:
    found = _output_dir_of(args)
    if isinstance(found, int):
        return found
    out, require_manifest = found
    if not out.is_dir():
        output.error(f"{out} is not a folder")
        return output.EXIT_NOT_FOUND
    listing = checkpoint_listing(out, world_size=args.world_size, require_manifest=require_manifest)
    if args.json:
        output.print_json(listing)
        return output.EXIT_OK
    if listing["checkpoints"]:
        output.stdout.print(_table(listing["checkpoints"]))
    else:
        output.stdout.print(f"no checkpoints in {out}")
    if listing["quarantined"]:
        output.stdout.print(_quarantine_table(listing["quarantined"]))
    return output.EXIT_OK


def _table(rows: list[dict[str, Any]]) -> Table:
    """Rows in the listing's JSON shape (`CheckpointReport.to_json`, plus
    `resume_candidate` from a listing): the table shows what --json says."""
    table = Table(box=None, pad_edge=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("saved", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("status", ratio=1)
    table.add_column("resumable", no_wrap=True)
    now = time.time()
    for row in rows:
        marker = " [bold cyan]← resume[/]" if row.get("resume_candidate") is True else ""
        table.add_row(
            "-" if row["step"] is None else str(row["step"]),
            dt.datetime.fromtimestamp(row["mtime"]).strftime("%Y-%m-%d %H:%M:%S"),
            format_duration(now - row["mtime"]),
            format_bytes(row["size_bytes"]),
            row["format"],
            _status(row),
            ("[green]yes[/]" if row["resumable"] else "[yellow]no[/]") + marker,
        )
    return table


def _status(row: dict[str, Any]) -> str:
    if not row["valid"]:
        extra = len(row["details"].get("problems", ())) - 1
        more = f" (+{extra} more)" if extra > 0 else ""
        return f"[red]invalid:[/] {escape(row['reason'] or '')}{more}"
    if not row["resumable"]:
        return f"[yellow]valid, {escape(row['reason'] or 'not resumable')}[/]"
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
