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
    """Make DeepSpeed's logger write to stderr, not stdout, in this process.

    When DeepSpeed is installed, transformers imports it on first use, and
    DeepSpeed gives its logger a handler on the stdout *of that moment*; on a
    host without a GPU it logs a warning at once. That line would corrupt
    `--json` output. Importing it here, with stdout pointed at stderr, binds
    the handler to stderr for the rest of the process (a second or two, and
    only where DeepSpeed is installed).
    """
    import contextlib
    import importlib
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Exception):
        importlib.import_module("deepspeed.utils.logging")  # a broken install: not ours to fix
