"""Issue 12, defect 3: a full state disk must not end supervision.

The daemon's state folder is a real 20 MiB tmpfs that the test fills to the
last byte; the daemon must keep answering, keep the truth in memory, say it is
degraded, carry a `stop` through, and write everything back once space returns.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.atomicio import write_json_atomic
from tests.disks import fill, tmpfs
from tests.supervisor_harness import TOY_TRAINER, Harness, wait_for


@pytest.fixture
def small_state() -> Iterator[Harness]:
    """A harness whose state folder (database, runs/, daemon log) is a 20 MiB tmpfs."""
    h = Harness()
    try:
        with tmpfs(h.state_dir, "20m", "mode=0700"):
            try:
                yield h
            finally:
                if h.daemon is not None:
                    print(f"--- daemon log ---\n{h.daemon_log()[-6000:]}")
                h.cleanup_processes()
    finally:
        h.cleanup()


def events(h: Harness) -> list[dict[str, Any]]:
    return list(h.cli_json("events", "--limit", "1000")["events"])


def disk_state(db: Path, job: str) -> str | None:
    """The job's state as a fresh reader of the file sees it (read-only: no checkpoint)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT state FROM jobs WHERE name=?", (job,)).fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def quiet_job(h: Harness, name: str) -> Path:
    """A toy trainer that writes no progress file and one short line a second: it
    survives a full state disk (its log page is already allocated)."""
    output_dir = h.work / name
    argv = [
        sys.executable,
        str(TOY_TRAINER),
        "--output-dir",
        str(output_dir),
        "--max-steps",
        "100000",
        "--step-time",
        "1.0",
        "--no-progress",
    ]
    path = h.work / f"{name}.toml"
    path.write_text(
        f'[job]\nname = "{name}"\noutput_dir = "{output_dir}"\n\n'
        f'[command]\nargv = {json.dumps(argv)}\n\n[restart]\nbackoff = "0.1s"\n'
    )
    return path


def test_full_state_disk_keeps_supervising_and_writes_back(small_state: Harness) -> None:
    h = small_state
    # The daemon-wide receiver: a command hook that writes outside the full disk.
    paged = h.work / "paged.jsonl"
    hook = f"import sys; open({str(paged)!r}, 'a').write(sys.stdin.read() + '\\n')"
    (h.state_dir / "daemon.toml").write_text(
        f'[notify]\ncommand = {json.dumps([sys.executable, "-c", hook])}\non = ["degraded"]\n'
    )
    h.start_daemon()
    h.cli("start", str(quiet_job(h, "full")))
    h.wait_state("full", "running")
    log = h.state_dir / "runs" / "full" / "attempt-1" / "stdout.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 30, what="the trainer's first line")

    filler = fill(h.state_dir)
    # The stop is the first write on the full disk: on 97b360c it raised
    # "database or disk is full" into the handler and the job stayed `stopping`.
    h.cli("stop", "full")
    final = h.wait_state("full", "stopped", timeout=90)
    assert final["state"] == "stopped"
    said = events(h)
    degraded = [e for e in said if e["kind"] == "degraded"]
    assert degraded and "full" in degraded[0]["message"]
    assert h.cli("ls", check=False).returncode == 0  # still answering
    assert h.cli_json("status")["degraded"]  # `ftsup status` says so too
    # ...and whoever is on call is told (a notification, not only an event).
    notes = wait_for(
        lambda: paged.exists() and [json.loads(x) for x in paged.read_text().splitlines() if x],
        60,
        what="the degraded notification",
    )
    assert notes[0]["event"] == "degraded" and notes[0]["job"] == "(daemon)"
    assert disk_state(h.state_dir / "ftsup.db", "full") != "stopped"  # the truth is in memory

    filler.unlink()
    wait_for(
        lambda: disk_state(h.state_dir / "ftsup.db", "full") == "stopped",
        60,
        0.2,
        "the final state to reach the disk",
    )
    assert any(e["kind"] == "recovered" for e in events(h))
    mirror = json.loads((h.state_dir / "runs" / "full" / "job.json").read_text())
    assert mirror["state"] == "stopped"  # the copies under runs/ were written again too
    # Lines logged while the disk was full were kept and written once space returned.
    wait_for(lambda: "keeping it in memory" in h.daemon_log(), 30, what="the backlog of the log")


def test_atomic_json_leaves_no_temp_file_on_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small") as folder:
        fill(folder)
        target = folder / "exit.json"
        with pytest.raises(OSError) as raised:
            write_json_atomic(target, {"returncode": 0, "pad": "x" * 20000})
        assert raised.value.errno == errno.ENOSPC
        # On 97b360c a 0-byte `.exit.json.tmp-<pid>` stayed behind.
        assert sorted(p.name for p in folder.iterdir()) == ["filler"]


LOGGER_SCRIPT = """
import logging, os, sys, time
from pathlib import Path
from ftsup.supervisor.service.logging_setup import setup_daemon_logging
setup_daemon_logging("INFO")
log = logging.getLogger("ftsup.daemon")
folder = Path(sys.argv[1])
log.info("before the disk filled")
filler = folder / "filler"
fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\\0" * 4096)
except OSError:
    os.close(fd)
for n in range(200):
    log.warning("line %d while the disk is full %s", n, "." * 60)
filler.unlink()
log.info("space is back")
print("survived", file=sys.__stdout__)
"""


def test_daemon_log_survives_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small") as folder:
        daemon_log = folder / "daemon.log"
        with daemon_log.open("ab") as stderr:
            result = subprocess.run(
                [sys.executable, "-c", LOGGER_SCRIPT, str(folder)],
                stderr=stderr,
                stdout=subprocess.PIPE,
                text=True,
                timeout=60,
                env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
            )
        assert result.returncode == 0 and "survived" in result.stdout
        lines = daemon_log.read_text().splitlines()
        said = [line.split("ftsup.daemon: ", 1)[-1] for line in lines]
        # Every line written while the disk was full arrives, in order, once it is not.
        full = [s for s in said if s.startswith("line ")]
        assert [int(s.split()[1]) for s in full] == list(range(200))
        assert said[0] == "before the disk filled" and said[-1] == "space is back"
