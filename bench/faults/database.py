"""Damaged databases: jobs run, the daemon is SIGKILLed, its SQLite database is
damaged (emptied, garbage over its header or pages, the WAL deleted, all of it
deleted) and the daemon restarted. `runs/<job>/` on disk must be enough: every
job must be listed again and its live run re-adopted and finished exactly.

Cases: one per restart (the daemon answers: ok; else crash) and one per job.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from bench.faults.daemon import Daemon
from bench.faults.outcomes import Case, Category, Config, Outcome
from bench.faults.procs import wait_until
from bench.faults.toyrun import judge_toy_run, toy_job

MODES = ("truncate", "garbage-header", "garbage-pages", "delete-wal", "delete-all")


def damage(db: Path, mode: str, rng: random.Random) -> str:
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    sizes = {p.name: p.stat().st_size for p in (db, wal, shm) if p.exists()}
    if mode == "truncate":
        db.write_bytes(b"")
    elif mode == "garbage-header":
        with db.open("r+b") as f:
            f.write(rng.randbytes(4096))
    elif mode == "garbage-pages":
        size = db.stat().st_size
        with db.open("r+b") as f:
            for _ in range(max(1, size // 4096 // 3)):
                f.seek(rng.randrange(4096, max(4097, size)))
                f.write(rng.randbytes(512))
    elif mode == "delete-wal":
        for p in (wal, shm):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    else:
        for p in (db, wal, shm):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return f"{mode} (files before: {sizes})"


def round_(config: Config, mode: str, index: int, rng: random.Random, cat: Category) -> None:
    daemon = Daemon(config.root / f"{mode}-{index}")
    steps = 120
    try:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        jobs = []
        for j in range(2):
            path, out = toy_job(daemon.work, f"db{index}{j}", steps=steps, step_time=0.05)
            daemon.cli("start", str(path))
            jobs.append((f"db{index}{j}", out))
        for _, out in jobs:
            wait_until(lambda out=out: (out / "checkpoint-5").exists(), 30)  # type: ignore[misc]
        daemon.kill()
        what = damage(daemon.state / "ftsup.db", mode, rng)
        if daemon.start(wait=30):
            listed = daemon.cli("ls", "--json").json() or {}
            names = {j.get("name") for j in listed.get("jobs", []) if isinstance(j, dict)}
            missing = [name for name, _ in jobs if name not in names]
            detail = f"{what}; restarted" + (
                f", jobs missing from ls: {missing}" if missing else ""
            )
            cat.add(Case(f"restart after {mode}", Outcome.OK, detail))
        else:
            log = daemon.new_log()
            cat.add(
                Case(f"restart after {mode}", Outcome.CRASH, f"{what}; no daemon: {log[-500:]}")
            )
        for job, out in jobs:
            case = judge_toy_run(daemon, job, out, steps, timeout=90, attempts=1)
            case.name = f"{mode}: {case.name}"
            cat.add(case)
    finally:
        daemon.stop()


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    modes = ["truncate", "delete-wal"] if config.quick else [m for m in MODES for _ in range(2)]
    for index, mode in enumerate(modes):
        round_(config, mode, index, rng, cat)
