"""`ftsup tui`: the live dashboard (Textual), locally or on a server through SSH.

`--host` and `--socket` repeat: with several daemons (one per node of a
multi-node job, issue 17) the TUI shows them as one, jobs named `JOB@LABEL`
(`ftsup.tui.multi`). One of either is exactly the single-daemon TUI.

Textual is imported only when the command runs, so the other commands (and
the daemon) never pay for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, layout_from

if TYPE_CHECKING:
    from ftsup.tui.source import Source
    from ftsup.tui.ssh import SshTunnel

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MIXED = (
    "--socket is the local socket; with --host use --remote-socket (to show a local "
    "daemon next to remote ones, label it: --socket LABEL=PATH)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup tui`."""
    parser = subparsers.add_parser(
        "tui",
        help="live dashboard: jobs, curves, checkpoints, events, logs, GPUs",
        description="Attach a terminal UI to the daemon's socket (locally, or on a server "
        "with --host through SSH socket forwarding). Jobs keep running when "
        "it exits; it reconnects on its own when the daemon restarts. Repeat "
        "--host/--socket to watch several daemons (the nodes of a multi-node "
        "job) as one: jobs are then shown as JOB@NODE.",
    )
    parser.add_argument(
        "--socket",
        action="append",
        default=None,
        metavar="[LABEL=]PATH",
        help="the daemon's socket (default: from --runtime-dir / the "
        "environment, as every ftsup command); repeatable: each daemon is "
        "labelled LABEL, or by the socket's folder name",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="USER@SERVER",
        help="attach to the daemon on SERVER: runs `ssh -N -L` to forward "
        "its socket, and cleans up on exit; repeatable (labelled SERVER)",
    )
    parser.add_argument(
        "--remote-socket",
        metavar="PATH",
        default=None,
        help="with --host: the daemon's socket on the server(s) (default: "
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


@dataclass(frozen=True)
class Daemon:
    """One daemon to attach to: a local socket, or a host to tunnel to."""

    label: str
    socket: Path | None = None
    host: str | None = None


def socket_entry(text: str) -> tuple[str | None, Path]:
    """`LABEL=PATH` -> (LABEL, PATH); a bare path -> (None, PATH)."""
    label, sep, path = text.partition("=")
    if sep and path and LABEL.fullmatch(label):
        return label, Path(path)
    return None, Path(text)


def host_label(host: str) -> str:
    """`me@gpu-box` -> `gpu-box`: the SERVER part names the node."""
    return host.rpartition("@")[2] or host


def _unique(label: str, taken: set[str]) -> str:
    label = label.replace("@", "_") or "node"
    shown, n = label, 2
    while shown in taken:
        shown, n = f"{label}-{n}", n + 1
    taken.add(shown)
    return shown


def plan(hosts: Iterable[str], sockets: Iterable[str]) -> list[Daemon]:
    """The labelled daemons of `--host ... --socket ...`, in the order given (hosts first)."""
    taken: set[str] = set()
    daemons = [Daemon(_unique(host_label(h), taken), host=h) for h in hosts]
    for text in sockets:
        label, path = socket_entry(text)
        name = label or path.parent.name or "local"
        daemons.append(Daemon(_unique(name, taken), socket=path))
    return daemons


def run(args: argparse.Namespace) -> int:
    """Run the TUI until the person quits."""
    hosts: list[str] = args.host or []
    sockets: list[str] = args.socket or []
    if hosts and any(socket_entry(s)[0] is None for s in sockets):
        output.error(MIXED)
        return output.EXIT_BAD_INPUT
    if len(hosts) + len(sockets) > 1:
        return _run_several(args, plan(hosts, sockets))
    from ftsup.tui.app import FtsupApp
    from ftsup.tui.connection import DaemonConnection
    from ftsup.tui.ssh import SshTunnel, TunnelError

    if not hosts:
        socket = socket_entry(sockets[0])[1] if sockets else layout_from(args).socket
        FtsupApp(DaemonConnection(socket)).run()
        return output.EXIT_OK
    host = hosts[0]
    tunnel = SshTunnel(host, args.remote_socket, options=ssh_options(args))
    try:
        print(f"ftsup: forwarding the daemon socket of {host} over ssh…", file=sys.stderr)
        FtsupApp(_tunnelled(tunnel, host)).run()
    except TunnelError as exc:
        output.error(str(exc), hint="check `ssh " + host + "` works without the TUI")
        return output.EXIT_NO_DAEMON
    finally:
        tunnel.close()
    return output.EXIT_OK


def _tunnelled(tunnel: SshTunnel, host: str) -> Source:
    """Open `tunnel` (raises TunnelError) and return the connection through it."""
    from ftsup.tui.connection import DaemonConnection

    local = tunnel.open()
    return DaemonConnection(
        local, target=f"{host}:{tunnel.remote_socket}", before_reconnect=tunnel.ensure_running
    )


def _run_several(args: argparse.Namespace, daemons: list[Daemon]) -> int:
    """Several daemons as one TUI (`ftsup.tui.multi.MultiSource`)."""
    from ftsup.tui.app import FtsupApp
    from ftsup.tui.multi import MultiSource
    from ftsup.tui.ssh import TunnelError

    tunnels: list[SshTunnel] = []
    try:
        sources = open_sources(daemons, args.remote_socket, ssh_options(args), tunnels)
    except TunnelError as exc:
        output.error(
            str(exc),
            hint="check `ssh HOST` works, or leave that --host off to watch the other nodes",
        )
        return output.EXIT_NO_DAEMON
    try:
        FtsupApp(MultiSource(sources)).run()
    finally:
        close_all(tunnels)
    return output.EXIT_OK


def open_sources(
    daemons: list[Daemon],
    remote_socket: str | None,
    options: list[str],
    tunnels: list[SshTunnel],
    *,
    ssh: tuple[str, ...] = ("ssh",),
) -> dict[str, Source]:
    """A connection per daemon, label -> source; the tunnels opened go into `tunnels`.

    Every tunnel is opened before the TUI takes the terminal (ssh may ask for a
    password). One that fails raises TunnelError naming its host, after closing
    the ones already open: the command then ends (leave that node off the
    command line to watch the others)."""
    from ftsup.tui.connection import DaemonConnection
    from ftsup.tui.ssh import SshTunnel, TunnelError

    sources: dict[str, Source] = {}
    for daemon in daemons:
        if daemon.host is None:
            assert daemon.socket is not None
            sources[daemon.label] = DaemonConnection(daemon.socket)
            continue
        tunnel = SshTunnel(daemon.host, remote_socket, ssh=ssh, options=options)
        tunnels.append(tunnel)
        print(f"ftsup: forwarding the daemon socket of {daemon.host} over ssh…", file=sys.stderr)
        try:
            sources[daemon.label] = _tunnelled(tunnel, daemon.host)
        except TunnelError as exc:
            close_all(tunnels)
            raise TunnelError(f"{daemon.host}: {exc}") from None
    return sources


def close_all(tunnels: list[SshTunnel]) -> None:
    """Stop every ssh and remove its local socket (idempotent)."""
    for tunnel in tunnels:
        tunnel.close()
