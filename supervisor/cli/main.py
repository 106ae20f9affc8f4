"""`ftsup` command line: one module per command group, each with `register()`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ftsup.supervisor import __version__

# Each module defines `register(subparsers)`, which adds its commands and sets
# `func(args) -> int` as the parser default.
COMMAND_MODULES = (
    "ftsup.supervisor.cli.jobs_cmd",
    "ftsup.supervisor.cli.check_cmd",
    "ftsup.supervisor.cli.daemon_cmd",
    "ftsup.supervisor.cli.service_cmd",
    "ftsup.supervisor.cli.gpus_cmd",
    "ftsup.supervisor.cli.ckpt_cmd",
    "ftsup.supervisor.cli.demo_cmd",
    "ftsup.supervisor.cli.export_cmd",
    "ftsup.supervisor.cli.tui_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftsup",
        description="Keep long fine-tuning runs alive: restart from the newest valid checkpoint.",
    )
    parser.add_argument("--version", action="version", version=f"ftsup {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
