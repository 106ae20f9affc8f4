"""The database is a cache of `runs/<job>/`: opened only when healthy, rebuilt from disk.

Every job keeps, beside its attempt folders, small JSON copies of its rows
(`job.json`, `attempts/<n>.json`, written by the Store on every change) next to
what the shim writes itself (`attempt-<n>/pids.json`, `exit.json`). So a
truncated, garbage-filled or WAL-less `ftsup.db` loses history (events,
checkpoint records), never a run: the daemon notices at start (quick_check,
expected tables, disk ahead of the database), moves the damaged files aside,
starts from `ftsup.db.bak` when that is healthy, puts back every job and
attempt found on disk, and says so with a `state_rebuilt` event. Live shims are
then re-adopted by the usual restore, which reads the database.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import read_json, write_json_atomic
from ftsup.supervisor.contract import EXIT_FILE, PIDS_FILE
from ftsup.supervisor.procinfo import is_same_process
from ftsup.supervisor.protocol import LIVE_STATES

log = logging.getLogger("ftsup.daemon")

JOB_MIRROR = "job.json"
ATTEMPT_MIRRORS = "attempts"
SPEC_FILE = "job.toml"
EXPECTED_TABLES = frozenset({"jobs", "attempts", "events", "checkpoints", "meta"})
JOB_COLUMNS = (
    "name",
    "spec_path",
    "spec_text",
    "kind",
    "output_dir",
    "state",
    "reason",
    "created_at",
    "updated_at",
    "next_start_at",
    "accept_drift",
    "first_attempt",
)
ATTEMPT_COLUMNS = (
    "job",
    "n",
    "started_at",
    "ended_at",
    "shim_pid",
    "shim_start",
    "trainer_pid",
    "trainer_start",
    "resume_from",
    "start_step",
    "last_step",
    "returncode",
    "signal",
    "stop_requested",
    "failure_kind",
    "reason",
)

Connect = Callable[[Path], sqlite3.Connection]


def attempt_mirror(run_dir: Path, n: int) -> Path:
    """`attempts/<n>.json`: never inside `attempt-<n>/`, whose existence tells the runner
    whether a warm standby may be renamed into it, nor named like it (tools glob it)."""
    return run_dir / ATTEMPT_MIRRORS / f"{n}.json"


# --- writing the copies ------------------------------------------------------
class RunMirror:
    """Writes the rows' copies under runs/; a failure is logged (once per streak), never
    raised: the database stays the daemon's truth, the copies are for a rebuild."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.failing = False

    def write_job(self, row: dict[str, Any]) -> None:
        self._write(self.runs_dir / row["name"] / JOB_MIRROR, row)

    def write_attempt(self, row: dict[str, Any]) -> None:
        self._write(attempt_mirror(self.runs_dir / row["job"], int(row["n"])), row)

    def write_all(self, db: sqlite3.Connection) -> None:
        """Every row again (after the disk came back: writes may have failed meanwhile)."""
        for row in db.execute("SELECT * FROM jobs"):
            self.write_job(dict(row))
        for row in db.execute("SELECT * FROM attempts"):
            self.write_attempt(dict(row))

    def _write(self, path: Path, row: dict[str, Any]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, row)
        except OSError as exc:
            if not self.failing:
                log.warning("cannot write %s (the database still has it): %s", path, exc)
            self.failing = True
            return
        self.failing = False


# --- opening a healthy database -------------------------------------------------
@dataclass
class Opened:
    db: sqlite3.Connection
    problem: str | None = None  # why the database was not used as it was
    moved_to: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # jobs put back from runs/


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def open_database(path: Path, runs_dir: Path, *, schema: str, connect: Connect) -> Opened:
    """A connection to a healthy `path` holding every job that `runs_dir` knows.

    Storage errors (disk full, I/O) are raised to the caller, which may run from
    memory; damage (not a database, failed check, lost tables) is repaired here.
    """
    problem = _pre_open_problem(path)
    db: sqlite3.Connection | None = None
    if problem is None:
        try:
            size = path.stat().st_size if path.exists() else 0  # before SQLite writes a header
            db = connect(path)
            problem = _health(db, size)
        except sqlite3.DatabaseError as exc:
            if is_storage_failure(exc):
                _close(db)
                raise
            problem = f"cannot be read ({exc})"
    opened: Opened
    if problem is not None:
        _close(db)
        moved = _move_aside(path)
        opened = Opened(_from_backup(path, connect), problem, moved)
    else:
        assert db is not None
        opened = Opened(db)
    opened.db.executescript(schema)
    behind = jobs_behind_disk(opened.db, runs_dir)
    if opened.problem is not None or behind:
        opened.rebuilt = reconcile(opened.db, runs_dir)
        _record(opened, behind)
    refresh_backup(opened.db, path)
    return opened


def is_storage_failure(exc: sqlite3.DatabaseError) -> bool:
    """The disk refused (full, I/O error, read-only): not the database's fault."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return any(
        words in text
        for words in ("disk is full", "disk i/o", "readonly", "read-only", "unable to open")
    )


def _pre_open_problem(path: Path) -> str | None:
    """A zero-length file beside a non-empty WAL: SQLite would delete the WAL and
    open an empty database without a word."""
    wal = path.with_name(path.name + "-wal")
    try:
        if path.stat().st_size == 0 and wal.stat().st_size > 0:
            return "the database file is empty (truncated) but its write-ahead log is not"
    except FileNotFoundError:
        pass
    return None


def _health(db: sqlite3.Connection, size: int) -> str | None:
    rows = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
    if rows != ["ok"]:
        return "integrity check failed: " + "; ".join(str(r) for r in rows[:3])
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = EXPECTED_TABLES - tables
    if missing and (tables or size > 0):
        # A file that has pages but not our tables lost them (a deleted WAL held them).
        return f"tables missing: {', '.join(sorted(missing))}"
    return None


def _close(db: sqlite3.Connection | None) -> None:
    if db is not None:
        db.close()


def _move_aside(path: Path) -> list[str]:
    """Keep the damaged files for a post-mortem, out of SQLite's way."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}"
    moved = []
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            target = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
            source.rename(target)
            moved.append(str(target))
    return moved


def _from_backup(path: Path, connect: Connect) -> sqlite3.Connection:
    """A new database at `path`: a copy of the backup when that one is healthy."""
    db = connect(path)
    bak = backup_path(path)
    if not bak.exists():
        return db
    try:
        source = sqlite3.connect(f"file:{bak}?mode=ro", uri=True)
        try:
            if _health(source, bak.stat().st_size) is None:
                source.backup(db)
        finally:
            source.close()
    except sqlite3.DatabaseError as exc:
        log.warning("the backup %s is not usable either: %s", bak, exc)
    return db


def refresh_backup(db: sqlite3.Connection, path: Path) -> bool:
    """Copy the whole database to `ftsup.db.bak` (temporary name, then rename)."""
    bak = backup_path(path)
    tmp = bak.with_name(f".{bak.name}.tmp")
    try:
        target = sqlite3.connect(tmp)
        try:
            db.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
        tmp.chmod(0o600)  # it holds the jobs' specs, secrets included
        tmp.replace(bak)
    except (sqlite3.DatabaseError, OSError) as exc:
        log.warning("cannot refresh the database backup %s: %s", bak, exc)
        tmp.unlink(missing_ok=True)
        return False
    return True


def _record(opened: Opened, behind: list[str]) -> None:
    why = opened.problem or f"runs/ is ahead of the database for {', '.join(behind)}"
    names = ", ".join(opened.rebuilt) or "no job"
    message = f"state rebuilt from runs/ ({why}): {names}"
    kept = f"; damaged files kept as {', '.join(opened.moved_to)}" if opened.moved_to else ""
    log.warning("%s%s", message, kept)
    data = {"jobs": opened.rebuilt, "reason": why, "moved_to": opened.moved_to}
    now = time.time()
    insert = "INSERT INTO events(ts, job, kind, message, data) VALUES (?, ?, 'state_rebuilt', ?, ?)"
    opened.db.execute(insert, (now, None, message, json.dumps(data)))
    for name in opened.rebuilt:
        opened.db.execute(insert, (now, name, f"job {name} rebuilt from runs/{name}", None))


# --- comparing with the disk ------------------------------------------------------
def _job_dirs(runs_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in runs_dir.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _attempt_numbers(run_dir: Path) -> list[int]:
    numbers = set()
    for folder in run_dir.glob("attempt-*"):
        stem = folder.name.removeprefix("attempt-")
        if stem.isdigit() and folder.is_dir():
            numbers.add(int(stem))
    for record in (run_dir / ATTEMPT_MIRRORS).glob("*.json"):
        if record.stem.isdigit():
            numbers.add(int(record.stem))
    return sorted(numbers)


def jobs_behind_disk(db: sqlite3.Connection, runs_dir: Path) -> list[str]:
    """Jobs whose files say more than the database: it lost writes."""
    behind = []
    for run_dir in _job_dirs(runs_dir):
        mirror = read_json(run_dir / JOB_MIRROR)
        numbers = _attempt_numbers(run_dir)
        if not isinstance(mirror, dict) and not numbers:
            continue  # job.toml alone: the submission never completed
        row = db.execute("SELECT * FROM jobs WHERE name=?", (run_dir.name,)).fetchone()
        top = db.execute("SELECT MAX(n) FROM attempts WHERE job=?", (run_dir.name,)).fetchone()
        if (
            row is None
            or (numbers and numbers[-1] > int(top[0] or 0))
            or (isinstance(mirror, dict) and _newer(mirror, dict(row)))
            or _attempt_mirrors_ahead(db, run_dir, numbers)
        ):
            behind.append(run_dir.name)
    return behind


def _newer(mirror: dict[str, Any], row: dict[str, Any]) -> bool:
    stamp = mirror.get("updated_at")
    return isinstance(stamp, (int, float)) and stamp > float(row["updated_at"]) + 1e-6


def _attempt_mirrors_ahead(db: sqlite3.Connection, run_dir: Path, numbers: list[int]) -> bool:
    for n in numbers:
        mirror = read_json(attempt_mirror(run_dir, n))
        if not isinstance(mirror, dict):
            continue
        row = db.execute(
            "SELECT ended_at, shim_pid FROM attempts WHERE job=? AND n=?", (run_dir.name, n)
        ).fetchone()
        if row is None:
            return True
        if any(
            mirror.get(key) is not None and row[key] is None for key in ("ended_at", "shim_pid")
        ):
            return True
    return False


# --- putting the rows back ---------------------------------------------------------
def reconcile(db: sqlite3.Connection, runs_dir: Path) -> list[str]:
    """Insert or update the rows of every job under `runs_dir` the database lacks or
    has older than the files; the names of the jobs changed."""
    changed = []
    for run_dir in _job_dirs(runs_dir):
        try:
            if _reconcile_job(db, run_dir):
                changed.append(run_dir.name)
        except (OSError, sqlite3.IntegrityError, ValueError, TypeError, KeyError) as exc:
            log.error("cannot rebuild job %s from %s: %s", run_dir.name, run_dir, exc)
    return changed


def _reconcile_job(db: sqlite3.Connection, run_dir: Path) -> bool:
    name = run_dir.name
    mirror = read_json(run_dir / JOB_MIRROR)
    numbers = _attempt_numbers(run_dir)
    if not isinstance(mirror, dict) and not numbers:
        return False
    current = db.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
    job = _job_from_files(run_dir, mirror, dict(current) if current else None)
    if job is None:
        return False
    attempts = [_attempt_from_files(db, run_dir, n, last=n == numbers[-1]) for n in numbers]
    last = attempts[-1] if attempts else None
    if last is not None and _shim_alive(last):
        last["ended_at"] = None  # a live shim outranks any record that says otherwise
        if job["state"] not in LIVE_STATES:
            job["state"], job["reason"] = "running", "re-adopted after the database was rebuilt"
    elif not isinstance(mirror, dict) and current is None:
        job.update(_state_without_mirror(run_dir, last))
    changed = _upsert(db, "jobs", JOB_COLUMNS, job, ("name",), current)
    for attempt in attempts:
        row = db.execute(
            "SELECT * FROM attempts WHERE job=? AND n=?", (name, attempt["n"])
        ).fetchone()
        changed = _upsert(db, "attempts", ATTEMPT_COLUMNS, attempt, ("job", "n"), row) or changed
    return changed


def _job_from_files(
    run_dir: Path, mirror: Any, current: dict[str, Any] | None
) -> dict[str, Any] | None:
    if isinstance(mirror, dict):
        if current is not None and not _newer(mirror, current):
            return current
        return {key: mirror.get(key) for key in JOB_COLUMNS} | {"name": run_dir.name}
    if current is not None:
        return current
    spec_file = run_dir / SPEC_FILE
    try:
        text = spec_file.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    kind, output_dir = _kind_and_output(text, spec_file)
    stamp = run_dir.stat().st_mtime
    return {
        "name": run_dir.name,
        "spec_path": str(spec_file),
        "spec_text": text,
        "kind": kind,
        "output_dir": output_dir,
        "state": "running",
        "reason": None,
        "created_at": stamp,
        "updated_at": time.time(),
        "next_start_at": None,
        "accept_drift": 0,
        "first_attempt": 1,
    }


def _kind_and_output(text: str, source: Path) -> tuple[str, str]:
    from ftsup.supervisor.spec import SpecError, parse_spec  # the full parser, only here

    try:
        spec = parse_spec(text, source)
    except SpecError:
        return "command", ""
    return ("command" if spec.command else "train"), str(spec.output_dir)


def _attempt_from_files(
    db: sqlite3.Connection, run_dir: Path, n: int, *, last: bool
) -> dict[str, Any]:
    row = db.execute("SELECT * FROM attempts WHERE job=? AND n=?", (run_dir.name, n)).fetchone()
    mirror = read_json(attempt_mirror(run_dir, n))
    folder = run_dir / f"attempt-{n}"
    pids = read_json(folder / PIDS_FILE)
    exit_info = read_json(folder / EXIT_FILE)
    pids = pids if isinstance(pids, dict) else {}
    exit_info = exit_info if isinstance(exit_info, dict) else None
    attempt: dict[str, Any] = dict.fromkeys(ATTEMPT_COLUMNS)
    attempt.update(job=run_dir.name, n=n, start_step=0, last_step=0, stop_requested=0)
    for source in (dict(row) if row else {}, mirror if isinstance(mirror, dict) else {}):
        attempt.update({k: v for k, v in source.items() if k in ATTEMPT_COLUMNS and v is not None})
    if row is not None:  # the step counter is written to the database alone
        attempt["last_step"] = max(int(attempt["last_step"] or 0), int(row["last_step"] or 0))
    for key in ("shim_pid", "shim_start", "trainer_pid", "trainer_start"):
        if attempt[key] is None:
            attempt[key] = pids.get(key)
    if attempt["started_at"] is None:
        attempt["started_at"] = (
            pids.get("started_at")
            or (exit_info or {}).get("started_at")
            or (folder.stat().st_mtime if folder.exists() else time.time())
        )
    if attempt["ended_at"] is None and exit_info is not None and not last:
        # The last attempt stays open: the runner re-adopts it and judges exit.json itself.
        attempt.update(
            ended_at=exit_info.get("ended_at", time.time()),
            returncode=exit_info.get("returncode"),
            signal=exit_info.get("signal"),
            stop_requested=int(bool(exit_info.get("stop_requested"))),
        )
    return attempt


def _shim_alive(attempt: dict[str, Any]) -> bool:
    pid, start = attempt.get("shim_pid"), attempt.get("shim_start")
    return isinstance(pid, int) and isinstance(start, int) and is_same_process(pid, start)


def _state_without_mirror(run_dir: Path, last: dict[str, Any] | None) -> dict[str, Any]:
    """No job.json (written by an older ftsup): a run no shim holds any more is over."""
    if last is None:
        return {"state": "stopped", "reason": "rebuilt from runs/: no attempt was recorded"}
    exit_info = read_json(run_dir / f"attempt-{last['n']}" / EXIT_FILE)
    if not isinstance(exit_info, dict):
        return {"state": "running", "reason": None}  # the runner follows or judges it
    last.update(
        ended_at=exit_info.get("ended_at", time.time()),
        returncode=exit_info.get("returncode"),
        signal=exit_info.get("signal"),
    )
    if exit_info.get("returncode") == 0:
        return {"state": "finished", "reason": "rebuilt from runs/: the last attempt exited 0"}
    return {
        "state": "stopped",
        "reason": f"rebuilt from runs/: the last attempt had ended ({exit_info.get('returncode')})",
    }


def _upsert(
    db: sqlite3.Connection,
    table: str,
    columns: tuple[str, ...],
    values: dict[str, Any],
    key: tuple[str, ...],
    current: sqlite3.Row | None,
) -> bool:
    values = {c: (int(v) if isinstance(v, bool) else v) for c, v in values.items() if c in columns}
    if current is not None and all(current[c] == values.get(c) for c in columns):
        return False
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in key)
    # Not INSERT OR REPLACE: replacing a job deletes its attempts (ON DELETE CASCADE).
    db.execute(
        f"INSERT INTO {table}({names}) VALUES ({marks}) "
        f"ON CONFLICT({', '.join(key)}) DO UPDATE SET {updates}",
        tuple(values.get(c) for c in columns),
    )
    return True
