"""The shim of a warm standby: a trainer started before it is needed.

A crash costs a cold start: Python, torch, transformers and peft imports, the
tokenized data (4 s and more, per restart). So while an attempt trains, the
daemon starts a standby: this shim and, under it, `python -m
ftsup.trainer.standby`, which does all of that and then waits. It holds no
output lock, touches no GPU and writes no checkpoint until it is activated.

    python -m ftsup.supervisor.standby_shim --standby-dir D [--output-dir O \\
        --job J] --grace 120 --daemon-pid P --daemon-start S -- ARGV...

A job's standby knows its job from the start; a daemon's spare (a standby
started before any job, `ftsup.supervisor.daemon.spares`) learns the job, its
output folder and its working folder from `activation.json`.

Activation: the daemon writes `activation.json` into D, renames D to the new
attempt's folder, and writes that folder's path to the FIFO `D/activate`.
The shim takes the output lock (waiting for the dead attempt's processes to
release it), hands the lock descriptor and the trainer arguments and
environment to the waiting trainer over a socket pair, and from then on is an
ordinary shim (`shim.supervise`): pids.json, stop handling, exit.json, and it
outlives the daemon. Before activation it lives only as long as its daemon
(a pidfd on the daemon), so a new daemon never inherits stale standbys; on
SIGTERM it discards the standby.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ftsup.supervisor import nofile
from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.contract import ENV_STANDBY_FD
from ftsup.supervisor.procinfo import is_same_process, process_start_time
from ftsup.supervisor.shim import (
    exit_at_once,
    killpg,
    lock_for_attempt,
    parse_shim_args,
    reserve_records,
    start_trainer,
    supervise,
    wakeup_pipe,
    write_exit,
    write_record,
)

STANDBY_FILE = "standby.json"  # pids and state ("warming", "ready", "ended") of a standby
ACTIVATION_FILE = "activation.json"  # {"attempt", "job", "args", "env"}, written by the daemon
FIFO_NAME = "activate"  # the daemon writes the new attempt folder's path here
MAX_MESSAGE = 1 << 20


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftsup-standby-shim")
    parser.add_argument("--standby-dir", type=Path, required=True)
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--daemon-start", type=int, default=None)
    return parse_shim_args(parser, argv, job_known=False)


def standby_command(
    standby_dir: Path,
    output_dir: Path | None,
    job: str | None,
    grace: float,
    daemon_pid: int,
    argv: list[str],
) -> list[str]:
    """The command line that starts this shim for the daemon `daemon_pid`. A spare
    (no job yet: `output_dir` and `job` None) learns both from its activation."""
    known: list[str] = []
    if output_dir is not None:
        known += ["--output-dir", str(output_dir)]
    if job is not None:
        known += ["--job", job]
    return [
        sys.executable,
        "-m",
        "ftsup.supervisor.standby_shim",
        "--standby-dir",
        str(standby_dir),
        *known,
        "--grace",
        str(grace),
        "--daemon-pid",
        str(daemon_pid),
        "--daemon-start",
        str(process_start_time(daemon_pid)),
        "--",
        *argv,
    ]


class _Discard:
    """Set by SIGTERM/SIGINT before activation: the daemon no longer wants this standby."""

    requested = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True


def run(args: argparse.Namespace) -> int:
    standby_dir: Path = args.standby_dir
    if not is_same_process(args.daemon_pid, args.daemon_start):
        shutil.rmtree(standby_dir, ignore_errors=True)
        return 0  # the daemon that wanted it is already gone
    reserve_records(standby_dir)  # renamed with the folder when it becomes an attempt
    daemon_fd = os.pidfd_open(args.daemon_pid)
    discard = _Discard()
    wake_r = wakeup_pipe()
    signal.signal(signal.SIGTERM, discard)
    signal.signal(signal.SIGINT, discard)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    fifo_fd = os.open(standby_dir / FIFO_NAME, os.O_RDWR | os.O_NONBLOCK)  # never sees EOF
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {**os.environ, ENV_STANDBY_FD: str(theirs.fileno())}
    child = start_trainer(args.argv, standby_dir, pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    info: dict[str, Any] = {
        "shim_pid": os.getpid(),
        "shim_start": process_start_time(os.getpid()),
        "trainer_pid": child.pid,
        "trainer_start": process_start_time(child.pid),
        "pgid": child.pid,
        "started_at": time.time(),
        "state": "warming",
    }
    write_record(standby_dir, STANDBY_FILE, info)
    attempt_dir = _wait_for_activation(
        child, ours, info, standby_dir, fifo_fd, daemon_fd, wake_r, discard
    )
    if attempt_dir is None:
        return 0
    return _take_over(args, child, ours, attempt_dir, wake_r)


def _wait_for_activation(
    child: subprocess.Popen[bytes],
    control: socket.socket,
    info: dict[str, Any],
    standby_dir: Path,
    fifo_fd: int,
    daemon_fd: int,
    wake_r: int,
    discard: _Discard,
) -> Path | None:
    """The new attempt's folder once activated; None when the standby ended instead."""
    child_fd = os.pidfd_open(child.pid)
    watched: list[Any] = [fifo_fd, control, child_fd, daemon_fd, wake_r]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if fifo_fd in ready:  # first: an activated standby must outlive the daemon
            line = os.read(fifo_fd, 4096).decode().strip()
            if line:
                return Path(line.splitlines()[-1])
        if control in ready:
            message = control.recv(MAX_MESSAGE)
            if not message:  # the trainer closed its end: it is dying (child_fd follows)
                watched.remove(control)
            with contextlib.suppress(ValueError):
                info.update(json.loads(message), state="ready", ready_at=time.time())
                write_record(standby_dir, STANDBY_FILE, info)
        if wake_r in ready:
            os.read(wake_r, 512)
        if child_fd in ready:  # it died while waiting: say how, and let the daemon judge
            _, status = os.waitpid(child.pid, 0)
            info.update(state="ended", returncode=os.waitstatus_to_exitcode(status))
            write_record(standby_dir, STANDBY_FILE, info)
            killpg(child.pid, signal.SIGKILL)
            return None
        if daemon_fd in ready or discard.requested:
            killpg(child.pid, signal.SIGKILL)
            child.wait()
            shutil.rmtree(standby_dir, ignore_errors=True)
            return None


def _take_over(
    args: argparse.Namespace,
    child: subprocess.Popen[bytes],
    control: socket.socket,
    attempt_dir: Path,
    wake_r: int,
) -> int:
    """Hand the waiting trainer its attempt: lock, arguments, environment, folder.
    The activation names the job, its output folder and grace (a spare was
    started before it knew them); the command line's are the fallback."""
    started_at = time.time()
    try:
        activation = read_json(attempt_dir / ACTIVATION_FILE) or {}
    except OSError:
        activation = {}
    job = activation.get("job") or args.job
    output_dir = activation.get("output_dir") or args.output_dir
    grace = float(activation.get("grace", args.grace))
    if output_dir is None:  # a spare activated without its job's folder: nothing to lock
        killpg(child.pid, signal.SIGKILL)
        child.wait()
        write_exit(
            attempt_dir,
            error="activation",
            message=f"{ACTIVATION_FILE} names no output folder",
            started_at=started_at,
            returncode=None,
            signal=None,
        )
        return 1
    holder = {"job": job, "attempt": activation.get("attempt"), "pid": os.getpid()}
    lock_fds = lock_for_attempt(Path(output_dir), attempt_dir, holder, started_at)
    if lock_fds is None:
        killpg(child.pid, signal.SIGKILL)
        child.wait()
        return 1
    payload = {
        "args": activation.get("args", []),
        "env": activation.get("env", {}),
        "cwd": activation.get("cwd"),
    }
    # If the trainer died meanwhile, supervise() records its exit like any other.
    with contextlib.suppress(OSError):
        socket.send_fds(control, [json.dumps(payload).encode()], lock_fds)
    for fd in lock_fds:
        os.close(fd)
    control.close()
    return supervise(child, attempt_dir, started_at=started_at, grace=grace, wake_r=wake_r)


def main(argv: Sequence[str] | None = None) -> int:
    nofile.restore_for_run()  # the trainer runs under its user's limits, not the daemon's
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    exit_at_once(main())  # the daemon waits for this process's end to restart the job
