"""The daemon's state in SQLite (WAL): jobs, attempts, events, checkpoints.

Only the daemon's event loop writes; every write is its own short transaction,
so a crash of the daemon at any point leaves a consistent database. Clients
never open it: they ask the daemon over the socket.

A failed write never ends supervision: when the disk refuses one (full, I/O
error), the whole database is copied into memory, the write is done there, and
the Store serves from memory ("degraded") while it tries every few seconds to
copy it back to disk. Every job and attempt row is also copied to
`runs/<job>/job.json` and `runs/<job>/attempts/<n>.json`, from which
`state_rebuild` rebuilds a damaged or lost database at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor import protocol
from ftsup.supervisor.daemon import state_rebuild
from ftsup.supervisor.daemon.state_rebuild import RunMirror, is_storage_failure
from ftsup.supervisor.policy import AttemptOutcome

log = logging.getLogger("ftsup.daemon")

SCHEMA_VERSION = 1
# Event kinds that were renamed: stored events are rewritten when the store opens.
RENAMED_EVENT_KINDS: dict[str, str] = {"checkpoint_requested": protocol.EventKind.SAVE_REQUESTED}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    spec_path TEXT NOT NULL,
    spec_text TEXT NOT NULL,
    kind TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_start_at REAL,
    accept_drift INTEGER NOT NULL DEFAULT 0,
    first_attempt INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS attempts (
    job TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    shim_pid INTEGER,
    shim_start INTEGER,
    trainer_pid INTEGER,
    trainer_start INTEGER,
    resume_from TEXT,
    start_step INTEGER NOT NULL DEFAULT 0,
    last_step INTEGER NOT NULL DEFAULT 0,
    returncode INTEGER,
    signal INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    failure_kind TEXT,
    reason TEXT,
    PRIMARY KEY (job, n)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    job TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job, id);
CREATE TABLE IF NOT EXISTS checkpoints (
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    step INTEGER,
    size_bytes INTEGER,
    valid INTEGER NOT NULL,
    resumable INTEGER NOT NULL,
    reason TEXT,
    seen_at REAL NOT NULL,
    PRIMARY KEY (job, path)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    job TEXT PRIMARY KEY,
    gpus TEXT NOT NULL,
    since REAL NOT NULL
);
"""

LIVE_STATES = protocol.LIVE_STATES  # one definition (state_rebuild's must equal it)
RETRY_INTERVAL = 2.0  # seconds between attempts to write a degraded store back to disk
BACKUP_INTERVAL = 600.0  # seconds between refreshes of ftsup.db.bak
ROOM_MARGIN = 1 << 20  # bytes left free after writing a degraded store back
TERMINAL_STATES = protocol.TERMINAL_STATES


@dataclass(frozen=True)
class JobRow:
    name: str
    spec_path: str
    spec_text: str
    kind: str
    output_dir: str
    state: str
    reason: str | None
    created_at: float
    updated_at: float
    next_start_at: float | None
    accept_drift: bool
    first_attempt: int  # attempts before this one belong to earlier submissions

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True)
class AttemptRow:
    job: str
    n: int
    started_at: float
    ended_at: float | None
    shim_pid: int | None
    shim_start: int | None
    trainer_pid: int | None
    trainer_start: int | None
    resume_from: str | None
    start_step: int
    last_step: int
    returncode: int | None
    signal: int | None
    stop_requested: bool
    failure_kind: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def outcome(self) -> AttemptOutcome:
        """What the restart policy judges (meaningful once the attempt ended)."""
        return AttemptOutcome(
            returncode=self.returncode,
            signal=self.signal,
            start_step=self.start_step,
            last_step=self.last_step,
            stop_requested=self.stop_requested,
            failure_kind=self.failure_kind,
        )


def ended_outcomes(attempts: list[AttemptRow]) -> list[AttemptOutcome]:
    """The restart policy's history: the outcomes of the attempts that ended."""
    return [a.outcome() for a in attempts if a.ended_at is not None]


StateListener = Callable[[str | None], None]


def connect(path: Path | str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode=WAL")  # raises on a file that is not a database
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _memory() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle | None:
    """On the daemon's loop, the one thread that uses the store; nothing without a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(delay, callback)


class Store:
    def __init__(self, path: Path, *, runs_dir: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.runs_dir = runs_dir or path.parent / "runs"
        self.mirror = RunMirror(self.runs_dir)
        self.rebuilt: list[str] = []  # jobs put back from runs/ when the store opened
        self._degraded: str | None = None
        self._listeners: list[StateListener] = []
        self._next_retry = 0.0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._backup_timer: asyncio.TimerHandle | None = None
        try:
            opened = state_rebuild.open_database(
                path, self.runs_dir, schema=_SCHEMA, connect=connect
            )
            self._db = opened.db
            self.rebuilt = opened.rebuilt
        except (sqlite3.DatabaseError, OSError) as exc:  # the disk refuses even to open it
            self._db = self._memory_copy(None)
            self._enter_degraded(f"cannot open {path}: {exc}")
        self._write(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        for old, new in RENAMED_EVENT_KINDS.items():  # history reads in today's words
            self._write("UPDATE events SET kind = ? WHERE kind = ?", (new, old))
        self._backup_timer = _call_later(BACKUP_INTERVAL, self._periodic_backup)

    def close(self) -> None:
        for timer in (self._retry_timer, self._backup_timer):
            if timer is not None:
                timer.cancel()
        if self._degraded is not None and not self.flush():
            log.error("state not written to %s (%s); runs/ has the jobs", self.path, self._degraded)
        if self._degraded is None:
            state_rebuild.refresh_backup(self._db, self.path)
        self._db.close()

    # degraded mode ----------------------------------------------------------
    @property
    def degraded(self) -> str | None:
        """Why the state lives in memory only (the disk refused a write), or None."""
        return self._degraded

    def add_state_listener(self, listener: StateListener) -> None:
        """Told the reason when the store degrades, and None when it has recovered."""
        self._listeners.append(listener)

    def flush(self) -> bool:
        """Copy a degraded store back to disk; True once the disk has it all."""
        if self._degraded is None:
            return True
        self._next_retry = time.monotonic() + RETRY_INTERVAL
        if not self._room_for_copy():
            return False
        disk: sqlite3.Connection | None = None
        try:
            disk = connect(self.path)
            self._db.backup(disk)
        except (sqlite3.DatabaseError, OSError) as exc:
            if disk is not None:
                disk.close()
            log.debug("the state disk still refuses: %s", exc)
            return False
        memory, self._db = self._db, disk
        memory.close()
        was = self._degraded
        self._degraded = None
        log.warning("state written back to %s; it was kept in memory since: %s", self.path, was)
        self.mirror.write_all(self._db)
        self._notify(None)
        return True

    def _room_for_copy(self) -> bool:
        """Whether the disk has room for the whole database (twice: WAL, then the file).
        A copy that fails halfway would leave its WAL holding the last free blocks,
        which the shims need for their exit records."""
        size = 1
        for pragma in ("page_count", "page_size"):
            size *= int(self._db.execute(f"PRAGMA {pragma}").fetchone()[0])
        try:
            info = os.statvfs(self.path.parent)
        except OSError:
            return False
        return info.f_bavail * info.f_frsize >= 2 * size + ROOM_MARGIN

    def _write(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        """Every write goes here: a write the disk refuses is done in memory instead."""
        if self._degraded is not None and time.monotonic() >= self._next_retry:
            self.flush()
        try:
            return self._db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            if self._degraded is not None or not is_storage_failure(exc):
                raise
            self._db = self._memory_copy(self._db)
            cursor = self._db.execute(sql, args)
            self._enter_degraded(str(exc))
            return cursor

    def _memory_copy(self, disk: sqlite3.Connection | None) -> sqlite3.Connection:
        """The database in memory: a copy of `disk`, or rebuilt from runs/ if unreadable."""
        memory = _memory()
        try:
            if disk is None:
                disk = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            disk.backup(memory)
        except sqlite3.DatabaseError as exc:
            log.error("cannot copy the state database into memory (%s); using runs/", exc)
            memory.executescript(_SCHEMA)
            state_rebuild.reconcile(memory, self.runs_dir)
        finally:
            if disk is not None:
                disk.close()
        return memory

    def _enter_degraded(self, reason: str) -> None:
        self._degraded = reason
        self._next_retry = time.monotonic() + RETRY_INTERVAL
        log.error("cannot write the state database (%s); keeping it in memory, retrying", reason)
        self._schedule_retry()
        self._notify(reason)

    def _schedule_retry(self) -> None:
        """Retried without writes too, so the last state reaches disk when space returns."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = _call_later(RETRY_INTERVAL, self._retry_tick)

    def _retry_tick(self) -> None:
        self._retry_timer = None
        if self._degraded is not None and not self.flush():
            self._schedule_retry()

    def _periodic_backup(self) -> None:
        if self._degraded is None:
            state_rebuild.refresh_backup(self._db, self.path)
        self._backup_timer = _call_later(BACKUP_INTERVAL, self._periodic_backup)

    def _notify(self, reason: str | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(reason)
            except Exception:
                log.exception("a store state listener failed")

    # copies under runs/ -------------------------------------------------------
    def _mirror_job(self, name: str) -> None:
        row = self._db.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
        if row is not None:
            self.mirror.write_job(dict(row))

    def _mirror_attempt(self, job: str, n: int) -> None:
        row = self._db.execute("SELECT * FROM attempts WHERE job=? AND n=?", (job, n)).fetchone()
        if row is not None:
            self.mirror.write_attempt(dict(row))

    # jobs -----------------------------------------------------------------
    def upsert_job(
        self,
        *,
        name: str,
        spec_path: str,
        spec_text: str,
        kind: str,
        output_dir: str,
        state: str,
        accept_drift: bool = False,
    ) -> None:
        """Submit a job; a finished job of the same name is replaced, its history kept."""
        now = time.time()
        first = self.next_attempt_number(name)
        self._write(
            """INSERT INTO jobs(name, spec_path, spec_text, kind, output_dir, state, reason,
                                created_at, updated_at, accept_drift, first_attempt)
               VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET spec_path=excluded.spec_path,
                 spec_text=excluded.spec_text, kind=excluded.kind,
                 output_dir=excluded.output_dir, state=excluded.state, reason=NULL,
                 updated_at=excluded.updated_at, accept_drift=excluded.accept_drift,
                 first_attempt=excluded.first_attempt, next_start_at=NULL""",
            (
                name,
                spec_path,
                spec_text,
                kind,
                output_dir,
                state,
                now,
                now,
                int(accept_drift),
                first,
            ),
        )
        self._mirror_job(name)

    def reset_first_attempt(self, name: str) -> None:
        """A manual restart starts a fresh restart budget and crash-loop count."""
        self._write(
            "UPDATE jobs SET first_attempt=? WHERE name=?", (self.next_attempt_number(name), name)
        )
        self._mirror_job(name)

    def set_spec_text(self, name: str, text: str) -> None:
        """The job file's text after `ftsup priority` changed it (the spec path stays)."""
        self._write(
            "UPDATE jobs SET spec_text=?, updated_at=? WHERE name=?", (text, time.time(), name)
        )
        self._mirror_job(name)

    def set_job_state(
        self, name: str, state: str, reason: str | None = None, next_start_at: float | None = None
    ) -> None:
        self._write(
            "UPDATE jobs SET state=?, reason=?, next_start_at=?, updated_at=? WHERE name=?",
            (state, reason, next_start_at, time.time(), name),
        )
        self._mirror_job(name)

    def get_job(self, name: str) -> JobRow | None:
        row = self._db.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
        return _job(row) if row else None

    def jobs(self) -> list[JobRow]:
        return [_job(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY created_at")]

    def live_job_on(self, output_dir: str) -> JobRow | None:
        marks = ",".join("?" * len(LIVE_STATES))
        row = self._db.execute(
            f"SELECT * FROM jobs WHERE output_dir=? AND state IN ({marks})",
            (output_dir, *LIVE_STATES),
        ).fetchone()
        return _job(row) if row else None

    # GPU allocations (the queue's; a new daemon reads who holds what) -----
    def set_allocation(self, job: str, gpus: tuple[int, ...]) -> None:
        self._write(
            "INSERT OR REPLACE INTO allocations(job, gpus, since) VALUES (?, ?, ?)",
            (job, json.dumps(list(gpus)), time.time()),
        )

    def clear_allocation(self, job: str) -> None:
        self._write("DELETE FROM allocations WHERE job=?", (job,))

    def allocations(self) -> dict[str, tuple[int, ...]]:
        found: dict[str, tuple[int, ...]] = {}
        for job, gpus in self._db.execute("SELECT job, gpus FROM allocations ORDER BY since"):
            with contextlib.suppress(ValueError, TypeError):
                found[job] = tuple(int(index) for index in json.loads(gpus))
        return found

    # attempts -------------------------------------------------------------
    def next_attempt_number(self, job: str) -> int:
        row = self._db.execute("SELECT MAX(n) FROM attempts WHERE job=?", (job,)).fetchone()
        return int(row[0] or 0) + 1

    def add_attempt(
        self, *, job: str, n: int, started_at: float, resume_from: str | None, start_step: int
    ) -> None:
        self._write(
            """INSERT INTO attempts(job, n, started_at, resume_from, start_step, last_step)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (job, n, started_at, resume_from, start_step, start_step),
        )
        self._mirror_attempt(job, n)

    def update_attempt(self, job: str, n: int, **fields: Any) -> None:
        allowed = set(AttemptRow.__dataclass_fields__) - {"job", "n"}
        unknown = set(fields) - allowed
        if unknown:
            raise KeyError(f"unknown attempt fields: {sorted(unknown)}")
        if not fields:
            return
        columns = ", ".join(f"{key}=?" for key in fields)
        values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
        self._write(f"UPDATE attempts SET {columns} WHERE job=? AND n=?", (*values, job, n))
        if set(fields) != {"last_step"}:  # the step counter changes too often to copy
            self._mirror_attempt(job, n)

    def attempts(self, job: str) -> list[AttemptRow]:
        rows = self._db.execute("SELECT * FROM attempts WHERE job=? ORDER BY n", (job,))
        return [_attempt(r) for r in rows]

    def current_attempts(self, job: str) -> list[AttemptRow]:
        """The attempts of the current submission (a new `start` or a manual restart
        begins a fresh restart budget; earlier attempts stay for the record)."""
        row = self._db.execute(
            "SELECT * FROM attempts WHERE job=? AND n >= "
            "(SELECT first_attempt FROM jobs WHERE name=?) ORDER BY n",
            (job, job),
        )
        return [_attempt(r) for r in row]

    def last_attempt(self, job: str) -> AttemptRow | None:
        row = self._db.execute(
            "SELECT * FROM attempts WHERE job=? ORDER BY n DESC LIMIT 1", (job,)
        ).fetchone()
        return _attempt(row) if row else None

    # events ---------------------------------------------------------------
    def add_event(
        self,
        job: str | None,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        ts: float | None = None,
    ) -> dict[str, Any]:
        ts = time.time() if ts is None else ts
        payload = json.dumps(data, default=str) if data else None
        cursor = self._write(
            "INSERT INTO events(ts, job, kind, message, data) VALUES (?, ?, ?, ?, ?)",
            (ts, job, kind, message, payload),
        )
        return {
            "id": cursor.lastrowid,
            "ts": ts,
            "job": job,
            "kind": kind,
            "message": message,
            "data": data or {},
        }

    def events(
        self, job: str | None = None, *, limit: int = 100, after_id: int = 0
    ) -> list[dict[str, Any]]:
        query = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if job is not None:
            query += " AND job = ?"
            args.append(job)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        rows = list(self._db.execute(query, args))
        return [_event(r) for r in reversed(rows)]

    # checkpoints ----------------------------------------------------------
    def record_checkpoint(
        self,
        job: str,
        *,
        path: str,
        step: int | None,
        size_bytes: int | None,
        valid: bool,
        resumable: bool,
        reason: str | None,
    ) -> None:
        self._write(
            """INSERT INTO checkpoints(job, path, step, size_bytes, valid, resumable, reason,
                                       seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(job, path) DO UPDATE SET step=excluded.step,
                 size_bytes=excluded.size_bytes, valid=excluded.valid,
                 resumable=excluded.resumable, reason=excluded.reason, seen_at=excluded.seen_at""",
            (job, path, step, size_bytes, int(valid), int(resumable), reason, time.time()),
        )

    def checkpoint(self, job: str, path: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT * FROM checkpoints WHERE job=? AND path=?", (job, path)
        ).fetchone()
        return dict(row) if row else None

    def checkpoints(self, job: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM checkpoints WHERE job=? ORDER BY step", (job,))
        return [dict(r) for r in rows]

    def iter_live_jobs(self) -> Iterator[JobRow]:
        return (job for job in self.jobs() if job.live)


def _job(row: sqlite3.Row) -> JobRow:
    data = dict(row)
    data["accept_drift"] = bool(data["accept_drift"])
    return JobRow(**data)


def _attempt(row: sqlite3.Row) -> AttemptRow:
    data = dict(row)
    data["stop_requested"] = bool(data["stop_requested"])
    return AttemptRow(**data)


def _event(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["data"] = json.loads(data["data"]) if data["data"] else {}
    return data
