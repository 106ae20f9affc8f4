"""What some tests need from the machine, checked so that its absence fails, never skips.

A test that skips when systemd-analyze, py-spy, root or a tmpfs mount is missing
passes CI without testing anything. `.ci/run` installs the tools and CI runs as
root, so a missing one is a broken environment: these helpers fail the test and
say what is missing and how to provide it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require(condition: bool, what: str, how: str) -> None:
    """Fail the test, naming `what` is missing and `how` to get it, unless `condition`."""
    if not condition:
        pytest.fail(f"{what}; {how}", pytrace=False)


def require_tool(name: str, how: str) -> str:
    """The path of executable `name`; the test fails if it is not on PATH."""
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed", how)
    assert path is not None
    return path


def require_root(why: str) -> None:
    require(os.geteuid() == 0, f"this test needs root ({why})", "run it as root, as CI does")


def require_py_spy_attaches(pid: int) -> str:
    """The py-spy executable, once it has read `pid`'s stacks (needs ptrace rights)."""
    exe = require_tool("py-spy", 'it is a dev dependency: pip install -e ".[dev]"')
    done = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, timeout=60)
    require(
        done.returncode == 0,
        f"py-spy cannot attach to pid {pid}: {done.stderr.decode(errors='replace').strip()}",
        "it needs ptrace rights (root, or kernel.yama.ptrace_scope=0)",
    )
    return exe
