"""Issue 12, defect 7: a damaged or lost database must not lose a run.

A real daemon supervises a real toy trainer; the daemon is SIGKILLed, its
database damaged (truncated, its write-ahead log deleted, garbage), and a new
daemon started. It must rebuild the job from `runs/<job>/`, re-adopt the live
attempt (the same shim), say what it rebuilt, and see the run to `finished`
without starting it a second time.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor_harness import Harness, wait_for

STEPS = 30
HOLD_AT = 3  # the trainer waits here while the test kills the daemon and damages its database


def truncate(db: Path) -> None:
    os.truncate(db, 0)  # `truncate -s0 ftsup.db`


def delete_wal(db: Path) -> None:
    db.with_name(db.name + "-wal").unlink()


def garbage(db: Path) -> None:
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            size = max(path.stat().st_size, 8192)
            path.write_bytes(os.urandom(size))


def jobs_in_main_file_alone(db: Path, scratch: Path) -> list[str]:
    """What the database file holds without its WAL (a copy, opened read-only)."""
    copy = scratch / "main-only.db"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM jobs")]
    except sqlite3.DatabaseError:  # no tables at all: they are in the WAL too
        return []
    finally:
        conn.close()


def events(h: Harness) -> list[dict[str, Any]]:
    return list(h.cli_json("events", "--limit", "1000")["events"])


@pytest.mark.parametrize("damage", [truncate, delete_wal, garbage], ids=lambda f: f.__name__)
def test_damaged_database_is_rebuilt_and_the_run_readopted(
    harness: Harness, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    h = harness
    h.start_daemon()
    hold = h.work / "hold"
    hold.touch()
    args = ["--max-steps", str(STEPS), "--hold-at", str(HOLD_AT), "--hold-file", str(hold)]
    h.cli("start", str(h.toy_job("dmg", *args)))
    h.wait_state("dmg", "running")
    wait_for(lambda: h.attempt_pids("dmg"), 30, what="the shim's pids.json")
    shim_pid = h.attempt_pids("dmg")[0]["shim_pid"]
    steps_log = h.work / "dmg" / "steps.log"
    wait_for(
        lambda: steps_log.exists() and h.steps("dmg")[-1:] == [HOLD_AT], 30, what="the held step"
    )
    db = h.state_dir / "ftsup.db"

    h.kill_daemon()
    if damage is delete_wal:
        # Nothing was checkpointed yet (1000 pages): the job lives in the WAL alone.
        assert db.with_name("ftsup.db-wal").stat().st_size > 0
        assert jobs_in_main_file_alone(db, tmp_path) == []
    damage(db)
    assert h.steps("dmg")[-1] < STEPS  # the trainer is still training, unsupervised

    h.start_daemon()
    # On 97b360c: `ls` is empty (truncated, deleted WAL) or the daemon does not start
    # (garbage), and the trainer finishes unsupervised.
    status = h.status("dmg")
    assert status["state"] in ("running", "stopping")
    said = events(h)
    rebuilt = [e for e in said if e["kind"] == "state_rebuilt" and e["job"] is None]
    assert rebuilt and rebuilt[-1]["data"]["jobs"] == ["dmg"]
    adopted = [e for e in said if e["kind"] == "adopted" and e["job"] == "dmg"]
    assert adopted and adopted[-1]["data"]["shim_pid"] == shim_pid
    hold.unlink()  # the trainer goes on, supervised again

    final = h.wait_state("dmg", "finished", "gave_up", "failed", "stopped", timeout=120)
    assert final["state"] == "finished", final
    assert h.steps("dmg") == list(range(1, STEPS + 1))  # every step once: never started twice
    assert len(h.attempt_pids("dmg")) == 1
    assert list(h.state_dir.glob("ftsup.db.damaged-*"))  # kept for a post-mortem


def test_store_keeps_copies_beside_the_attempt_folders(tmp_path: Path) -> None:
    from ftsup.supervisor.store import Store

    store = Store(tmp_path / "ftsup.db")
    store.upsert_job(
        name="j",
        spec_path="/x/j.toml",
        spec_text='[job]\nname = "j"\n',
        kind="command",
        output_dir="/x/out",
        state="pending",
    )
    store.add_attempt(job="j", n=1, started_at=1.0, resume_from="/x/out/ckpt-5", start_step=5)
    store.set_job_state("j", "running")
    store.close()
    run_dir = tmp_path / "runs" / "j"
    # The runner decides from `attempt-1/`'s existence whether a standby may become it.
    assert not (run_dir / "attempt-1").exists()
    job = json.loads((run_dir / "job.json").read_text())
    assert (job["state"], job["spec_path"], job["output_dir"]) == ("running", "/x/j.toml", "/x/out")
    attempt = json.loads((run_dir / "attempts" / "1.json").read_text())
    assert (attempt["resume_from"], attempt["start_step"]) == ("/x/out/ckpt-5", 5)
    assert (run_dir / "job.json").stat().st_mode & 0o077 == 0  # it may hold secrets

    (tmp_path / "ftsup.db").unlink()  # lost, with no WAL left to tell
    rebuilt = Store(tmp_path / "ftsup.db")
    try:
        assert rebuilt.rebuilt == ["j"]
        row = rebuilt.get_job("j")
        assert row is not None and (row.state, row.spec_path) == ("running", "/x/j.toml")
        [attempt_row] = rebuilt.attempts("j")
        assert (attempt_row.resume_from, attempt_row.start_step) == ("/x/out/ckpt-5", 5)
        assert attempt_row.ended_at is None  # open: the restore re-adopts and judges it
    finally:
        rebuilt.close()


def test_runs_without_copies_are_rebuilt_from_the_shims_files(tmp_path: Path) -> None:
    """Runs of an older ftsup have job.toml and the shims' records only."""
    from ftsup.supervisor.store import Store

    run_dir = tmp_path / "runs" / "old"
    for n, code in ((1, 1), (2, 0)):
        folder = run_dir / f"attempt-{n}"
        folder.mkdir(parents=True)
        exit_record = {"started_at": 10.0 * n, "ended_at": 10.0 * n + 5, "returncode": code}
        (folder / "exit.json").write_text(json.dumps({**exit_record, "signal": None}))
    (run_dir / "job.toml").write_text(
        f'[job]\nname = "old"\noutput_dir = "{tmp_path / "out"}"\n\n[command]\nargv = ["true"]\n'
    )
    store = Store(tmp_path / "ftsup.db")
    try:
        assert store.rebuilt == ["old"]
        job = store.get_job("old")
        assert job is not None and job.state == "finished" and job.kind == "command"
        assert job.output_dir == str(tmp_path / "out")
        assert [(a.n, a.returncode, a.ended_at) for a in store.attempts("old")] == [
            (1, 1, 15.0),
            (2, 0, 25.0),
        ]
        assert any(e["kind"] == "state_rebuilt" for e in store.events())
    finally:
        store.close()
