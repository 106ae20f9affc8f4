"""`ftsup tui`: the live dashboard (Textual), locally or on a server through SSH.

Textual is imported only when the command runs, so the other commands (and
the daemon) never pay for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, layout_from


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup tui`."""
    parser = subparsers.add_parser(
        "tui",
        help="live dashboard: jobs, curves, checkpoints, events, logs, GPUs",
        description="Attach a terminal UI to the daemon's socket (locally, or on a server "
        "with --host through SSH socket forwarding). Jobs keep running when "
        "it exits; it reconnects on its own when the daemon restarts.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the daemon's socket (default: from --runtime-dir / the "
        "environment, as every ftsup command)",
    )
    parser.add_argument(
        "--host",
        metavar="USER@SERVER",
        default=None,
        help="attach to the daemon on SERVER: runs `ssh -N -L` to forward "
        "its socket, and cleans up on exit",
    )
    parser.add_argument(
        "--remote-socket",
        metavar="PATH",
        default=None,
        help="with --host: the daemon's socket on the server (default: "
        "resolved there like the daemon does, e.g. "
        "/run/user/UID/ftsup/ftsup.sock; /run/ftsup/ftsup.sock for "
        "the system unit)",
    )
    parser.add_argument(
        "--ssh-option",
        "-o",
        action="append",
        default=[],
        metavar="OPT",
        help="with --host: an ssh -o option (repeatable), e.g. -o Port=2222",
    )
    add_common(parser, json_flag=False)
    parser.set_defaults(func=run)


def ssh_options(args: argparse.Namespace) -> list[str]:
    return [part for option in args.ssh_option for part in ("-o", option)]


def run(args: argparse.Namespace) -> int:
    """Run the TUI until the person quits."""
    if args.host and args.socket:
        output.error("--socket is the local socket; with --host use --remote-socket")
        return output.EXIT_BAD_INPUT
    from ftsup.tui.app import FtsupApp
    from ftsup.tui.connection import DaemonConnection
    from ftsup.tui.ssh import SshTunnel, TunnelError

    if not args.host:
        socket = args.socket or layout_from(args).socket
        FtsupApp(DaemonConnection(socket)).run()
        return output.EXIT_OK
    tunnel = SshTunnel(args.host, args.remote_socket, options=ssh_options(args))
    try:
        print(f"ftsup: forwarding the daemon socket of {args.host} over ssh…", file=sys.stderr)
        local = tunnel.open()
        connection = DaemonConnection(
            local,
            target=f"{args.host}:{tunnel.remote_socket}",
            before_reconnect=tunnel.ensure_running,
        )
        FtsupApp(connection).run()
    except TunnelError as exc:
        output.error(str(exc), hint="check `ssh " + args.host + "` works without the TUI")
        return output.EXIT_NO_DAEMON
    finally:
        tunnel.close()
    return output.EXIT_OK
