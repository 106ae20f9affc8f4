"""Options every daemon-facing command shares, and the connection to the daemon."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor.cli import output
from ftsup.supervisor.client import Client, DaemonNotAnswering, DaemonUnavailable, DaemonUntrusted
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import RequestError

ERROR_EXIT_CODES = {
    "not_found": output.EXIT_NOT_FOUND,
    "invalid_spec": output.EXIT_BAD_INPUT,
    "bad_request": output.EXIT_BAD_INPUT,
    "job_exists": output.EXIT_REFUSED,
    "output_locked": output.EXIT_REFUSED,
    "not_running": output.EXIT_REFUSED,
    "forbidden": output.EXIT_REFUSED,
    "busy": output.EXIT_REFUSED,
}


def add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    group = parser.add_argument_group("daemon")
    group.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state folder (default: $FTSUP_STATE_DIR or $XDG_STATE_HOME/ftsup)",
    )
    group.add_argument(
        "--runtime-dir",
        type=Path,
        default=None,
        help="socket folder (default: $FTSUP_RUNTIME_DIR or $XDG_RUNTIME_DIR/ftsup)",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def layout_from(args: argparse.Namespace) -> Layout:
    return Layout.from_env(args.state_dir, args.runtime_dir)


def connect(args: argparse.Namespace) -> Client:
    return Client(layout_from(args).socket)


def run_request(
    args: argparse.Namespace,
    action: Callable[[Client], dict[str, Any]],
    render: Callable[[dict[str, Any]], None],
) -> int:
    """Connect, run one action, print the result (rich or JSON), map errors to exit codes."""
    result = ask(args, action)
    if isinstance(result, int):
        return result
    if getattr(args, "json", False):
        output.print_json(result)
    else:
        render(result)
    return output.EXIT_OK


def ask(
    args: argparse.Namespace, action: Callable[[Client], dict[str, Any]]
) -> dict[str, Any] | int:
    """Connect and run one action; on failure the error is reported and its exit code
    returned instead (the caller returns it)."""
    try:
        with connect(args) as client:
            return action(client)
    except DaemonUnavailable as exc:
        return report_unavailable(args, exc)
    except RequestError as exc:
        return report_request_error(args, exc)


def report_unavailable(args: argparse.Namespace, exc: DaemonUnavailable) -> int:
    """No daemon (exit 3), or a socket that is not ours: refused, nothing sent (exit 5)."""
    if isinstance(exc, DaemonUntrusted):
        code, exit_code, hint = "not_private", output.EXIT_REFUSED, exc.hint
    elif isinstance(exc, DaemonNotAnswering):
        code, exit_code = "no_daemon", output.EXIT_NO_DAEMON
        hint = "the daemon is frozen or overloaded; see its log (`daemon.log` in the state folder)"
    else:
        code, exit_code = "no_daemon", output.EXIT_NO_DAEMON
        hint = "`ftsup start JOB.toml` starts a daemon; or run `ftsup daemon` (or the systemd unit)"
    if getattr(args, "json", False):
        output.print_json({"ok": False, "error": {"code": code, "message": str(exc)}})
    else:
        output.error(str(exc), hint=hint)
    return exit_code


def report_request_error(args: argparse.Namespace, exc: RequestError) -> int:
    if getattr(args, "json", False):
        output.print_json(
            {"ok": False, "error": {"code": exc.code, "message": exc.message, "data": exc.data}}
        )
    else:
        output.error(exc.message)
    return ERROR_EXIT_CODES.get(exc.code, output.EXIT_FAILED)
