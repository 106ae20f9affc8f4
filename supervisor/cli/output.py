"""Output helpers shared by every CLI command: rich for people, JSON for scripts.

Exit codes (documented in the README, stable for scripts):
0 ok; 1 the operation failed; 2 bad input (job file, arguments);
3 the daemon is not reachable; 4 no such job or checkpoint; 5 refused (conflict).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_DAEMON = 3
EXIT_NOT_FOUND = 4
EXIT_REFUSED = 5

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON document on stdout, nothing else (scripts parse it)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, *, hint: str | None = None) -> None:
    """An error for people; the texts are printed literally (job files contain `[table]`)."""
    stderr.print("[bold red]error:[/] ", end="")
    stderr.print(message, markup=False)
    if hint:
        stderr.print("[dim]hint:[/] ", end="")
        stderr.print(hint, markup=False)


def libraries_log_to_stderr() -> None:
    """Make the ML libraries' import-time loggers write to stderr, not stdout.

    DeepSpeed (imported by transformers whenever it is installed) gives its
    logger a handler on the stdout *of the moment* and, on a host without a
    GPU, logs a warning at once: that line would corrupt `--json` output.
    Importing it here, with stdout pointed at stderr, binds that handler to
    stderr for the rest of the process. Without transformers, nothing to do.
    """
    import contextlib
    import importlib

    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(ImportError):
        importlib.import_module("transformers.integrations.deepspeed")
