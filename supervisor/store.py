"""The daemon's state in SQLite (WAL): jobs, attempts, events, checkpoints.

Only the daemon's event loop writes; every write is its own short transaction,
so a crash of the daemon at any point leaves a consistent database. Clients
never open it: they ask the daemon over the socket.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

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
"""

LIVE_STATES = ("pending", "starting", "running", "backoff", "stopping")
TERMINAL_STATES = ("finished", "stopped", "gave_up", "failed")


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


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def close(self) -> None:
        self._db.close()

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
        self._db.execute(
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

    def reset_first_attempt(self, name: str) -> None:
        """A manual restart starts a fresh restart budget and crash-loop count."""
        self._db.execute(
            "UPDATE jobs SET first_attempt=? WHERE name=?", (self.next_attempt_number(name), name)
        )

    def set_job_state(
        self, name: str, state: str, reason: str | None = None, next_start_at: float | None = None
    ) -> None:
        self._db.execute(
            "UPDATE jobs SET state=?, reason=?, next_start_at=?, updated_at=? WHERE name=?",
            (state, reason, next_start_at, time.time(), name),
        )

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

    # attempts -------------------------------------------------------------
    def next_attempt_number(self, job: str) -> int:
        row = self._db.execute("SELECT MAX(n) FROM attempts WHERE job=?", (job,)).fetchone()
        return int(row[0] or 0) + 1

    def add_attempt(
        self, *, job: str, n: int, started_at: float, resume_from: str | None, start_step: int
    ) -> None:
        self._db.execute(
            """INSERT INTO attempts(job, n, started_at, resume_from, start_step, last_step)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (job, n, started_at, resume_from, start_step, start_step),
        )

    def update_attempt(self, job: str, n: int, **fields: Any) -> None:
        allowed = set(AttemptRow.__dataclass_fields__) - {"job", "n"}
        unknown = set(fields) - allowed
        if unknown:
            raise KeyError(f"unknown attempt fields: {sorted(unknown)}")
        if not fields:
            return
        columns = ", ".join(f"{key}=?" for key in fields)
        values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
        self._db.execute(f"UPDATE attempts SET {columns} WHERE job=? AND n=?", (*values, job, n))

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
        cursor = self._db.execute(
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
        self._db.execute(
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
