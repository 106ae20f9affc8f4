"""Capture the Python stacks of a hung trainer before it is killed.

`py-spy dump` reads another process's stacks from outside (ptrace), so it works
on any Python trainer, even a stopped one. Without py-spy (or without ptrace
rights) ftsup falls back to a convention: a trainer that called

    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True)

prints every thread's stack to its log when it gets that signal. SIGUSR1 and
SIGUSR2 are taken (the built-in trainer's stop and checkpoint requests), so the
convention uses the real-time signal SIGRTMIN+2. A signal's default action is
to terminate, so it is only sent to processes whose signal mask shows that they
catch it (`SigCgt` in /proc/<pid>/status).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

STACK_DUMP_SIGNAL: Final[int] = signal.SIGRTMIN + 2
STACK_DUMP_SIGNAL_NAME: Final = "SIGRTMIN+2"
Tool = Literal["auto", "py-spy", "faulthandler"]


def catches_signal(pid: int, signum: int) -> bool:
    """Whether `pid` installed a handler for `signum` (its `SigCgt` mask)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def capture_stacks(
    pids: Sequence[int], out_file: Path, timeout: float, *, tool: Tool = "auto"
) -> str:
    """Write the stacks of `pids` to `out_file`; return a one-line summary.

    Never raises for a process that is gone or not Python; what could not be
    captured is said in the summary and in the file.
    """
    deadline = time.monotonic() + timeout
    py_spy = shutil.which("py-spy") if tool in ("auto", "py-spy") else None
    sections: list[str] = []
    spied: list[int] = []
    signalled: list[int] = []
    missed: list[str] = []
    for pid in pids:
        if py_spy is not None:
            ok, text = _py_spy_dump(py_spy, pid, max(1.0, deadline - time.monotonic()))
            sections.append(f"== pid {pid}: py-spy dump ==\n{text.rstrip()}\n")
            if ok:
                spied.append(pid)
                continue
            if tool == "py-spy":
                missed.append(f"pid {pid}: {text}")
                continue
        elif tool == "py-spy":
            missed.append(f"pid {pid}: py-spy is not installed")
            continue
        sent, note = _request_faulthandler_dump(pid)
        sections.append(f"== pid {pid}: faulthandler ==\n{note}\n")
        if sent:
            signalled.append(pid)
        else:
            missed.append(f"pid {pid}: {note}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(sections) or "no processes\n")
    return _summary(out_file, spied, signalled, missed)


def _py_spy_dump(exe: str, pid: int, timeout: float) -> tuple[bool, str]:
    """A blocking dump (consistent stacks); a stopped process only allows --nonblocking."""
    modes = [["--nonblocking"]] if _state(pid) == "T" else [[], ["--nonblocking"]]
    deadline = time.monotonic() + timeout
    result = (False, "py-spy did not run")
    for extra in modes:
        result = _run_py_spy([exe, "dump", *extra, "--pid", str(pid)], deadline)
        if result[0]:
            break
    return result


def _run_py_spy(argv: list[str], deadline: float) -> tuple[bool, str]:
    timeout = max(1.0, deadline - time.monotonic())
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, errors="replace"
        )
    except subprocess.TimeoutExpired:
        return False, f"py-spy timed out after {timeout:.0f} s"
    except OSError as err:
        return False, f"py-spy could not run: {err}"
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        detail = (errors or lines or [f"exit {done.returncode}"])[0]
        return False, f"py-spy failed: {detail}"
    return True, done.stdout


def _request_faulthandler_dump(pid: int) -> tuple[bool, str]:
    if not catches_signal(pid, STACK_DUMP_SIGNAL):
        return False, (
            f"not signalled: the process does not catch {STACK_DUMP_SIGNAL_NAME} "
            "(no faulthandler.register), and the signal would kill it"
        )
    try:
        os.kill(pid, STACK_DUMP_SIGNAL)
    except OSError as err:
        return False, f"could not signal: {err.strerror}"
    note = f"sent {STACK_DUMP_SIGNAL_NAME}: faulthandler writes the stacks to the trainer's log"
    if _state(pid) == "T":
        note += " when the process is continued (it is stopped now)"
    return True, note


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def _summary(out_file: Path, spied: list[int], signalled: list[int], missed: list[str]) -> str:
    parts = []
    if spied:
        parts.append(f"py-spy stacks of pid {_pids(spied)} in {out_file}")
    if signalled:
        parts.append(f"stacks written to the log by faulthandler (pid {_pids(signalled)})")
    if missed:
        parts.append("no stacks for " + "; ".join(missed))
    return "; ".join(parts) or "no processes to capture"


def _pids(pids: list[int]) -> str:
    return ", ".join(str(pid) for pid in pids)
