"""`ftsup daemon`: run the supervisor daemon in the foreground (systemd, or by hand)."""

from __future__ import annotations

import argparse

from ftsup.supervisor.cli.common import add_common, layout_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("daemon", help="run the supervisor daemon in the foreground")
    add_common(p, json_flag=False)
    p.set_defaults(func=cmd_daemon)


def cmd_daemon(args: argparse.Namespace) -> int:
    from ftsup.supervisor.daemon.app import run_daemon

    return run_daemon(layout_from(args))
