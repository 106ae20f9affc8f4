"""Descriptor exhaustion, two ways, while a job with valid checkpoints crashes and
is relaunched:

* flood: the daemon under a low RLIMIT_NOFILE (soft = hard), nearly every
  descriptor asked for by idle client connections after `hello`;
* squeeze: the live daemon's soft limit lowered (prlimit) to the descriptors it
  holds, so that it can open nothing at all for a few seconds, then restored.

"Could not check" is not "corrupt": no valid checkpoint may be quarantined, and
the job must resume from the newest one and finish once descriptors are back. A
fresh `ftsup ls` meanwhile must answer or refuse clearly (not hang).
"""

from __future__ import annotations

import os
import resource
import socket
import time

from bench.faults.daemon import Daemon
from bench.faults.frames import HELLO, frame, read_reply
from bench.faults.outcomes import Case, Category, Config, classify_cli
from bench.faults.procs import wait_until
from bench.faults.toyrun import judge_toy_run, toy_job


def flood(daemon: Daemon, count: int) -> tuple[list[socket.socket], int]:
    """`count` idle connections after `hello`; (sockets, how many were refused)."""
    socks, refused = [], 0
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        socks.append(sock)
        try:
            sock.connect(str(daemon.runtime / "ftsup.sock"))
            sock.sendall(frame(HELLO))
            kind, message = read_reply(sock)
            if kind != "reply" or (message or {}).get("type") != "hello":
                refused += 1  # a `busy` error frame or a closed connection
        except OSError:
            refused += 1
    return socks, refused


def round_(daemon: Daemon, nofile: int, job: str, cat: Category) -> None:
    # Checkpoints at 5 and 10, a crash at 12: the relaunch happens under exhaustion.
    path, out = toy_job(daemon.work, job, steps=30, step_time=0.15, args=("--crash-at", "12"))
    daemon.cli("start", str(path))
    wait_until(lambda: (out / "steps.log").exists(), 30)
    socks, refused = flood(daemon, nofile - 8)
    try:
        res = daemon.cli("ls", timeout=20)
        outcome, detail = classify_cli(res)
        cat.add(
            Case(
                f"`ftsup ls` with {len(socks) - refused} idle connections (nofile {nofile})",
                outcome,
                detail,
            )
        )
        wait_until(lambda: (out / ".crashed-at-12").exists(), 30)
        time.sleep(3.0)  # the relaunch and its checkpoint checks run out of descriptors
    finally:
        for sock in socks:
            sock.close()
    case = judge_toy_run(daemon, job, out, 30, timeout=90, attempts=2)
    case.name = f"crash and relaunch at nofile {nofile} ({job}, {refused} connections refused)"
    cat.add(case)
    health = daemon.health(15)
    if health:
        cat.add(Case(f"daemon after nofile {nofile}", *health))


def squeeze(daemon: Daemon, job: str, hold: float, cat: Category) -> None:
    path, out = toy_job(daemon.work, job, steps=30, step_time=0.15, args=("--crash-at", "12"))
    daemon.cli("start", str(path))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_until(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), 60)
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (held, old[1]))
    try:
        res = daemon.cli("ls", timeout=20)
        outcome, detail = classify_cli(res)
        cat.add(Case(f"`ftsup ls` while the daemon can open nothing ({job})", outcome, detail))
        wait_until(lambda: (out / ".crashed-at-12").exists(), 30)
        time.sleep(hold)  # the relaunch and its checkpoint checks find no descriptor
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    case = judge_toy_run(daemon, job, out, 30, timeout=90, attempts=2)
    case.name = f"crash and relaunch with no descriptor left for {hold:.0f}s ({job})"
    cat.add(case)
    # asyncio itself logs (with a traceback) an accept() that fails for EMFILE, and
    # retries a second later: handled, not a crash.
    health = daemon.health(15, benign=("in accept -> OSError: [Errno 24]",))
    if health:
        cat.add(Case(f"daemon after the squeeze ({job})", *health))


def run(config: Config, cat: Category) -> None:
    daemon = Daemon(config.root / "squeeze")
    try:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        for i, hold in enumerate([3.0] if config.quick else [1.0, 3.0, 6.0]):
            squeeze(daemon, f"sq{i}", hold, cat)
    finally:
        daemon.stop()
    limits = [256] if config.quick else [256, 128, 48, 1024]
    for i, nofile in enumerate(limits):
        daemon = Daemon(config.root / f"n{i}")
        try:
            if not daemon.start(nofile=nofile):
                raise RuntimeError(f"the daemon did not start; see {daemon.log}")
            round_(daemon, nofile, f"fd{i}", cat)
        finally:
            daemon.stop()
