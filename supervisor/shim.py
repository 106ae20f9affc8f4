"""The shim: one per attempt, between the daemon and the trainer (conmon pattern).

Started by the daemon in its own session, it outlives the daemon. It takes the
output-folder lock, starts the trainer in a new process group with its output
in `stdout.log`, forwards stop signals to the group (SIGTERM, then SIGKILL
after the grace period, even if the daemon is gone meanwhile), and finally
writes `exit.json` atomically. The daemon learns everything from files: no pipe
ties the trainer's life to the daemon's.

`exit.json` and `pids.json` cannot fail for lack of space: their bytes are
reserved (`posix_fallocate`) when the shim starts, and each record is written
into its reserved file and renamed into place, which needs no new data block.

    python -m ftsup.supervisor.shim --attempt-dir D --output-dir O --job J \
        --attempt N --grace 120 -- ARGV...

A warm standby's shim (`standby_shim`) starts its trainer early and, once
activated, takes the lock the same way and ends in the same `supervise`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import BinaryIO, NoReturn

from ftsup.supervisor import nofile, outlock

# The attempt folder's files are the contract's; named here too (explicit
# re-export) because code that starts or reads shims imports them from here.
from ftsup.supervisor.contract import EXIT_FILE as EXIT_FILE
from ftsup.supervisor.contract import LOG_FILE as LOG_FILE
from ftsup.supervisor.contract import PIDS_FILE as PIDS_FILE
from ftsup.supervisor.procinfo import child_pids, group_members, process_start_time

# Signals the shim passes on to the trainer's process group unchanged
# (SIGUSR1: save and stop, SIGUSR2: save and continue).
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
RESERVE_BYTES = 16 * 1024  # far more than either record takes
GROUP_POLL_S = 0.1  # after a stop: how often to look whether the group has ended
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
MAX_ORPHAN_ROUNDS = 50  # killing an orphan may orphan its own children: a few rounds
RESERVE_SUFFIX = ".reserve"


class _StopState:
    """What the signal handlers asked for; the main loop acts on it."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.kill_deadline: float | None = None
        self.escalated = False


def parse_shim_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], *, job_known: bool = True
) -> argparse.Namespace:
    """Add the options every shim takes (output folder, job, grace, the command
    after `--`) to `parser`, which holds its own, and parse `argv`. `job_known`
    False: the job and its folder may come later (a daemon's spare standby)."""
    parser.add_argument("--output-dir", type=Path, required=job_known)
    parser.add_argument("--job", required=job_known)
    parser.add_argument("--grace", type=float, default=120.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("no command given after --")
    return args


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftsup-shim")
    parser.add_argument("--attempt-dir", type=Path, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument(
        "--lock-group", default=None, help="a multi-node job's rendezvous id: share the lock"
    )
    return parse_shim_args(parser, argv)


def _say(message: str) -> None:
    """A note to shim.log; a full disk must not turn a note into a crash."""
    with contextlib.suppress(OSError, ValueError):
        print(f"ftsup-shim: {message}", file=sys.stderr, flush=True)


def _reserve_path(folder: Path, name: str) -> Path:
    return folder / f".{name}{RESERVE_SUFFIX}"


def reserve_records(folder: Path) -> None:
    """Set aside the bytes of `exit.json` and `pids.json` while there is space."""
    for name in (EXIT_FILE, PIDS_FILE):
        _reserve(_reserve_path(folder, name))


def _reserve(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        _say(f"cannot reserve {path.name}: {exc}")
        return
    try:
        if os.fstat(fd).st_size >= RESERVE_BYTES:
            return  # reserved already (a standby's folder that became an attempt's)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.pwrite(fd, bytes(RESERVE_BYTES), 0)  # no fallocate here: real zeros
        os.fsync(fd)
    except OSError as exc:
        _say(f"cannot reserve {path.name}: {exc}")
    finally:
        os.close(fd)


def write_record(folder: Path, name: str, record: dict[str, object]) -> bool:
    """`folder/name` as JSON, atomically, into its reserved bytes when there are
    some (write, truncate, fsync, rename: no new data block is needed), else by
    a plain temporary file that is removed if it cannot be completed."""
    data = _encode(record)
    reserve = _reserve_path(folder, name)
    if reserve.exists():
        try:
            _commit_reserved(reserve, folder / name, data)
            return True
        except OSError as exc:
            _say(f"cannot write {name} into its reserved space: {exc}")
    try:
        _write_plain(folder / name, data)
    except OSError as exc:
        _say(f"cannot write {name}: {exc}; record: {data.decode(errors='replace')}")
        return False
    return True


def _encode(record: dict[str, object]) -> bytes:
    data = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
    if len(data) <= RESERVE_BYTES:
        return data
    # Only free text can be this long (a lock holder's message): cut it, keep the facts.
    short = {k: (v[:1000] if isinstance(v, str) else v) for k, v in record.items()}
    short.pop("holder", None)
    return json.dumps(short, sort_keys=True, default=str).encode()[:RESERVE_BYTES]


def _commit_reserved(reserve: Path, target: Path, data: bytes) -> None:
    fd = os.open(reserve, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(reserve, target)
    _fsync_dir(target.parent)


def _write_plain(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # never leave a half-written or empty temporary file
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_exit(attempt_dir: Path, **fields: object) -> bool:
    return write_record(attempt_dir, EXIT_FILE, {"ended_at": time.time(), **fields})


def lock_for_attempt(
    output_dir: Path,
    attempt_dir: Path,
    holder: dict[str, object],
    started_at: float,
    group: str | None = None,
) -> list[int] | None:
    """The output-folder lock's descriptors (a multi-node job's `group` shares it
    with its other nodes), or None after writing a `locked` exit.json."""
    try:
        return outlock.acquire_after_predecessor(output_dir, holder, group=group)
    except outlock.OutputLocked as exc:
        write_exit(
            attempt_dir,
            error="locked",
            message=str(exc),
            holder=exc.holder,
            started_at=started_at,
            returncode=None,
            signal=None,
        )
        return None


def run(args: argparse.Namespace) -> int:
    attempt_dir: Path = args.attempt_dir
    attempt_dir.mkdir(parents=True, exist_ok=True)
    reserve_records(attempt_dir)  # first: the disk may be full by the time the trainer ends
    started_at = time.time()
    holder = {"job": args.job, "attempt": args.attempt, "pid": os.getpid()}
    lock_fds = lock_for_attempt(args.output_dir, attempt_dir, holder, started_at, args.lock_group)
    if lock_fds is None:
        return 1
    wake_r = wakeup_pipe()
    try:
        child = start_trainer(args.argv, attempt_dir, pass_fds=lock_fds)
    except OSError as exc:
        with contextlib.suppress(OSError), open_log(attempt_dir, buffering=-1) as log:
            log.write(f"ftsup: cannot start {args.argv[0]!r}: {exc}\n".encode())
        write_exit(
            attempt_dir,
            error="spawn",
            message=f"cannot start {args.argv[0]!r}: {exc}",
            started_at=started_at,
            returncode=127,
            signal=None,
        )
        return 1
    for fd in lock_fds:  # the trainer holds it now; it is released when the trainer dies
        os.close(fd)
    return supervise(child, attempt_dir, started_at=started_at, grace=args.grace, wake_r=wake_r)


def open_log(folder: Path, *, buffering: int = 0) -> BinaryIO:
    """The attempt's stdout.log for appending: 0600 (it may hold secrets the trainer
    prints) whatever the umask, and never through a symlink."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return open(os.open(folder / LOG_FILE, flags, 0o600), "ab", buffering=buffering)


def start_trainer(
    argv: Sequence[str], folder: Path, *, pass_fds: Sequence[int], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The trainer in its own process group, its output appended to `folder/stdout.log`,
    with `pass_fds` (the output lock's, or a standby's control socket) inherited."""
    with open_log(folder) as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            pass_fds=tuple(pass_fds),
            env=env,
        )


def wakeup_pipe() -> int:
    """A pipe the signal machinery writes to, so `select` wakes up for handlers."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    return wake_r


def supervise(
    child: subprocess.Popen[bytes],
    attempt_dir: Path,
    *,
    started_at: float,
    grace: float,
    wake_r: int,
) -> int:
    """From a started trainer to `exit.json`: pids, stop handling, the group's end.
    No write failure ends supervision: the trainer is followed to its end regardless."""
    pgid = child.pid
    become_subreaper()
    reserve_records(attempt_dir)  # no-op where done at start; a standby's renamed folder
    write_record(
        attempt_dir,
        PIDS_FILE,
        {
            "shim_pid": os.getpid(),
            "shim_start": process_start_time(os.getpid()),
            "trainer_pid": child.pid,
            "trainer_start": process_start_time(child.pid),
            "pgid": pgid,
            "started_at": started_at,
        },
    )
    state = _StopState()
    _install_handlers(state, pgid, grace)
    status = _wait(child, state, pgid, wake_r)
    if state.stop_requested and not state.escalated:
        _wait_for_the_rest(state, pgid)
    # Anything left goes too: the group (dataloader workers) and the orphans that came
    # to this shim (torchrun workers in sessions of their own whose launcher died).
    killpg(pgid, signal.SIGKILL)
    kill_orphans()
    returncode = os.waitstatus_to_exitcode(status)
    write_exit(
        attempt_dir,
        started_at=started_at,
        returncode=returncode if returncode >= 0 else None,
        signal=-returncode if returncode < 0 else None,
        trainer_pid=child.pid,
        stop_requested=state.stop_requested,
        escalated=state.escalated,
    )
    return 0


def _install_handlers(state: _StopState, pgid: int, grace: float) -> None:
    def on_stop(signum: int, _frame: FrameType | None) -> None:
        if not state.stop_requested:
            state.stop_requested = True
            state.kill_deadline = time.monotonic() + grace
            killpg(pgid, signal.SIGTERM)

    def on_forward(signum: int, _frame: FrameType | None) -> None:
        killpg(pgid, signal.Signals(signum))

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for sig in FORWARDED:
        signal.signal(sig, on_forward)


def _wait(child: subprocess.Popen[bytes], state: _StopState, pgid: int, wake_r: int) -> int:
    """Wait for the trainer; escalate to SIGKILL when the grace period runs out."""
    pidfd = os.pidfd_open(child.pid)
    while True:
        timeout = None
        if state.kill_deadline is not None and not state.escalated:
            timeout = max(0.0, state.kill_deadline - time.monotonic())
        ready, _, _ = select.select([pidfd, wake_r], [], [], timeout)
        if wake_r in ready:
            os.read(wake_r, 512)
        if pidfd in ready:
            _, status = os.waitpid(child.pid, 0)
            os.close(pidfd)
            return status
        deadline = state.kill_deadline
        if deadline is not None and not state.escalated and time.monotonic() >= deadline:
            state.escalated = True
            killpg(pgid, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphans of the trainer's processes become this shim's children, not init's:
    a worker that outlives its launcher (torchrun starts each in a session of its
    own) is then still found, waited for and ended with the attempt."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _wait_for_the_rest(state: _StopState, pgid: int) -> None:
    """After a stop, the command may end before the trainer it launched: a launcher
    with no SIGTERM handler (`accelerate launch`) dies at once while the trainer
    below it is still saving. The rest gets the grace period too, and the stop
    reaches the orphans outside the group (in sessions of their own) as well."""
    told: set[int] = set()
    while True:
        _reap()
        orphans = child_pids(os.getpid())
        for pid in set(orphans) - told:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            told.add(pid)
        if not (group_members(pgid) or orphans):
            return
        if state.kill_deadline is not None and time.monotonic() >= state.kill_deadline:
            state.escalated = True
            return
        time.sleep(GROUP_POLL_S)


def kill_orphans() -> None:
    """SIGKILL every process that was reparented to this shim, and theirs in turn."""
    for _ in range(MAX_ORPHAN_ROUNDS):
        _reap()
        orphans = child_pids(os.getpid())
        if not orphans:
            return
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(GROUP_POLL_S)


def killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def main(argv: Sequence[str] | None = None) -> int:
    nofile.restore_for_run()  # the trainer runs under its user's limits, not the daemon's
    return run(_parse(sys.argv[1:] if argv is None else argv))


def exit_at_once(code: int) -> NoReturn:
    """End the shim without Python's finalization. The daemon waits for this process
    to end before it restarts the job, and tearing down the interpreter's modules and
    objects took 15-25 ms of every restart here (docs/benchmarks.md); everything the
    shim wrote (exit.json, its log) is already the kernel's, unbuffered."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_at_once(main())
