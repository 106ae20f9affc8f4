"""Full state disk: the daemon's state folder on a 20 MB tmpfs, filled to the last
byte while jobs run, then freed.

Per round: a job runs through the full spell and must end finished with the
exact result, its exit records intact (no 0-byte temporary exit file); a job
stopped (`stop`, then `stop --now`) while the disk is full must reach `stopped`
with its trainer gone. The daemon must answer throughout. The tmpfs is always
unmounted at the end.
"""

from __future__ import annotations

import contextlib
import errno
import random
import subprocess
import time
from pathlib import Path

from bench.faults.daemon import Daemon
from bench.faults.outcomes import Case, Category, Config, Outcome
from bench.faults.procs import group_alive, kill_groups, newest_pids, wait_until
from bench.faults.toyrun import judge_toy_run, toy_job


def fill(mount: Path) -> int:
    """Write until ENOSPC; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with (mount / "filler").open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # The last few KiB too.
    with (mount / "filler-small").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 512):
            written += 512
    return written


def free(mount: Path) -> None:
    for name in ("filler", "filler-small"):
        with contextlib.suppress(FileNotFoundError):
            (mount / name).unlink()


def leftover_exit_temps(state: Path) -> list[str]:
    return [
        str(p.relative_to(state))
        for p in state.glob("runs/*/attempt-*/*")
        if ".tmp" in p.name and p.stat().st_size == 0
    ]


def run_through(daemon: Daemon, mount: Path, job: str, rng: random.Random) -> Case:
    path, out = toy_job(daemon.work, job, steps=120, step_time=0.03)
    daemon.cli("start", str(path))
    wait_until(
        lambda: (out / "steps.log").exists() and len((out / "steps.log").read_text()) > 100, 30
    )
    fill(mount)
    time.sleep(rng.uniform(0.5, 2.0))
    answered = daemon.answers(15)
    free(mount)
    case = judge_toy_run(daemon, job, out, 120, timeout=90)
    case.name = f"run through a full disk ({job})"
    events = daemon.cli("events", "-n", "100000", "--json").json() or {}
    kinds = {str(e.get("kind")) for e in events.get("events", []) if isinstance(e, dict)}
    said = sorted(kinds & {"degraded", "recovered"})
    case.detail += f"; said {said or 'nothing'} about the disk"  # informational
    temps = leftover_exit_temps(daemon.state)
    if temps and case.outcome is Outcome.OK:
        case.outcome, case.detail = Outcome.LOST, f"exit records lost: 0-byte {temps}"
    if not answered and case.outcome is Outcome.OK:
        case.outcome, case.detail = (
            Outcome.CRASH,
            "the daemon did not answer while the disk was full",
        )
    return case


def stop_while_full(daemon: Daemon, mount: Path, job: str, now: bool) -> Case:
    name = f"`stop{' --now' if now else ''}` while the disk is full ({job})"
    path, out = toy_job(
        daemon.work, job, steps=100000, step_time=0.05, restart='stop_grace = "3s"\n'
    )
    daemon.cli("start", str(path))
    wait_until(lambda: (out / "steps.log").exists(), 30)
    pids = newest_pids(daemon.state, job)
    fill(mount)
    try:
        res = daemon.cli("stop", job, *(["--now"] if now else []), timeout=20)
        final = daemon.wait_final(job, 30)
    finally:
        free(mount)
    trainer_alive = pids is not None and group_alive(int(pids["pgid"]))
    if pids is not None:
        kill_groups({int(pids["pgid"])})
    if res.rc is None or "Traceback" in res.text:
        return Case(name, Outcome.CRASH, f"stop: {res.text[-400:] or 'hang'}")
    if final is None:
        now_status = daemon.status(job)
        state = now_status.get("state") if now_status else "no answer"
        return Case(name, Outcome.CRASH, f"never final while full: still {state}")
    if trainer_alive:
        return Case(name, Outcome.LOST, f"recorded {final.get('state')} but the trainer still runs")
    if final.get("state") != "stopped":
        return Case(name, Outcome.LOST, f"ended {final.get('state')}: {final.get('reason')}")
    return Case(name, Outcome.OK, f"stopped: {final.get('reason')}")


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    config.root.mkdir(parents=True, exist_ok=True)
    mount = config.root / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    daemon = Daemon(config.root, state=mount / "s")
    try:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        rounds = 1 if config.quick else 3
        for i in range(rounds):
            cat.add(run_through(daemon, mount, f"df{i}", rng))
            health = daemon.health(15)
            if health:
                cat.add(Case(f"daemon after round {i}", *health))
            cat.add(stop_while_full(daemon, mount, f"dfs{i}", now=False))
            cat.add(stop_while_full(daemon, mount, f"dfn{i}", now=True))
            health = daemon.health(15)
            if health:
                cat.add(Case(f"daemon after stops {i}", *health))
    finally:
        daemon.stop()
        time.sleep(0.2)
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)
