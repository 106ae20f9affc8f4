"""The kernel's and the cgroup's OOM-kill records (best effort, never raising)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ftsup.supervisor.health.oom import (
    OomBaseline,
    cgroup_dir,
    find_oom_line,
    oom_kill_count,
    read_oom_record,
)

# As mm/oom_kill.c prints it, through dmesg (which adds the [seconds] stamp).
KERNEL_LOG = (Path(__file__).parent / "logs" / "kernel_oom_kill.txt").read_text()


def test_find_oom_line_prefers_the_killed_process_line() -> None:
    line = find_oom_line(KERNEL_LOG, 48213)
    assert line is not None
    assert line.startswith("Out of memory: Killed process 48213 (python3) total-vm:231845120kB")


def test_find_oom_line_other_pid() -> None:
    assert find_oom_line(KERNEL_LOG, 4821) is None
    assert find_oom_line(KERNEL_LOG, 999) is None


def test_cgroup_counters_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.events").write_text(
        "low 0\nhigh 12\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n"
    )
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert oom_kill_count(v2) == 2
    assert oom_kill_count(v1) == 5
    assert oom_kill_count(tmp_path / "missing") is None


def test_baseline_counts_only_a_rise(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("oom 0\noom_kill 1\n")
    baseline = OomBaseline(tmp_path, 1)
    dead = _dead_pid()
    assert read_oom_record(dead, baseline=baseline) is None
    (tmp_path / "memory.events").write_text("oom 1\noom_kill 2\n")
    record = read_oom_record(dead, baseline=baseline)
    assert record == f"cgroup {tmp_path}: oom_kill rose from 1 to 2 during the attempt"


def test_real_cgroup_of_this_process() -> None:
    directory = cgroup_dir(os.getpid())
    if directory is None:  # no memory cgroup mounted: nothing to read, and nothing raised
        assert OomBaseline.capture(os.getpid()) is None
        return
    baseline = OomBaseline.capture(os.getpid())
    assert baseline is not None and baseline.oom_kills >= 0


def test_never_raises_for_a_dead_or_odd_pid() -> None:
    assert read_oom_record(_dead_pid()) is None
    assert cgroup_dir(_dead_pid()) is None
    assert read_oom_record(-1) is None


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)
