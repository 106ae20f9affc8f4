"""A full disk under the shim and the trainer (issue 12, defect 3): the shim's exit
record survives it, and the trainer's progress writer does not crash on it.

Real tmpfs mounts (we run as root here and in CI), filled to the last page while
a real shim and trainer run on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.supervisor.procinfo import group_members
from ftsup.supervisor.shim import EXIT_FILE, PIDS_FILE
from tests.disks import fill, tmpfs
from tests.supervisor_harness import wait_for


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_exit_record_is_written_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """The shim used to leave a 0-byte `.exit.json.tmp-<pid>` and no exit.json: the
    exit status was lost. Its bytes are now reserved when the attempt starts."""
    attempt_dir = small_disk / "attempt-1"
    go = tmp_path / "go"
    trainer = textwrap.dedent(f"""\
        import os, sys, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        sys.exit(7)
    """)
    shim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ftsup.supervisor.shim",
            "--attempt-dir",
            str(attempt_dir),
            "--output-dir",
            str(tmp_path / "out"),
            "--job",
            "full",
            "--attempt",
            "1",
            "--grace",
            "5",
            "--",
            sys.executable,
            "-c",
            trainer,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pgid = None
    try:
        pids = wait_for(
            lambda: _json(attempt_dir / PIDS_FILE), what="the shim to start the trainer"
        )
        pgid = pids["pgid"]
        fill(small_disk)
        go.touch()
        shim_rc = shim.wait(60)
        assert (attempt_dir / EXIT_FILE).exists(), sorted(os.listdir(attempt_dir))
        record = json.loads((attempt_dir / EXIT_FILE).read_text())
        assert record["returncode"] == 7 and record["signal"] is None
        assert record["trainer_pid"] == pids["trainer_pid"]
        assert not [p.name for p in attempt_dir.iterdir() if ".tmp-" in p.name]
        assert shim_rc == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        if pgid is not None and group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
        shim.wait(10)


WRITER = """\
import json, os, sys, time
from ftsup.trainer.progress import ProgressWriter

folder, go, freed = sys.argv[1:4]
writer = ProgressWriter(os.path.join(folder, "progress.jsonl"))
writer.emit("train_start", step=0, max_steps=400)
open(os.path.join(go, "started"), "w").close()
while not os.path.exists(os.path.join(go, "full")):
    time.sleep(0.05)
for step in range(1, 301):  # 300 lines of ~100 bytes: well past the file's last page
    writer.emit("step", step=step, max_steps=400, loss=1.0 / step, note="x" * 40)
print(json.dumps({"dropped_while_full": writer.dropped}), flush=True)
open(os.path.join(go, "wrote"), "w").close()
while not os.path.exists(freed):
    time.sleep(0.05)
writer.emit("train_end", step=300)
writer.close()
print(json.dumps({"dropped": writer.dropped}), flush=True)
"""


def test_progress_writer_survives_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """A trainer's progress line on a full disk used to raise ENOSPC out of
    `ProgressWriter.emit` and kill the training process."""
    signals = tmp_path / "signals"
    signals.mkdir()
    freed = tmp_path / "freed"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(small_disk), str(signals), str(freed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (signals / "started").exists() or proc.poll() is not None)
        fill(small_disk)
        (signals / "full").touch()
        wait_for(lambda: (signals / "wrote").exists() or proc.poll() is not None)
        (small_disk / "filler").unlink()  # space returns: the next line goes through
        freed.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    reports = [json.loads(line) for line in out.splitlines()]
    assert reports[0]["dropped_while_full"] > 0
    lines = (small_disk / "progress.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines if line]  # no line is cut or glued
    assert events[0]["event"] == "train_start" and events[-1]["event"] == "train_end"
    written_steps = [e["step"] for e in events if e["event"] == "step"]
    assert len(written_steps) + reports[1]["dropped"] == 300


def _json(path: Path) -> dict[str, object] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
