"""`ftsup daemon`: run the supervisor daemon in the foreground (systemd, or by hand)."""

from __future__ import annotations

import argparse

from ftsup.supervisor.cli.common import add_common, layout_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("daemon", help="run the supervisor daemon in the foreground")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (off by default)",
    )
    p.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address of the metrics endpoint (default: loopback only)",
    )
    add_common(p, json_flag=False)
    p.set_defaults(func=cmd_daemon)


def cmd_daemon(args: argparse.Namespace) -> int:
    from ftsup.supervisor.daemon.app import run_daemon
    from ftsup.supervisor.daemon.services import MetricsOptions

    metrics = MetricsOptions(port=args.metrics_port, address=args.metrics_address)
    return run_daemon(layout_from(args), metrics)
