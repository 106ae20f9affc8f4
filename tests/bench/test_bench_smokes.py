"""The chaos benchmark and the fault suite keep working, each in its smallest size.

No timing assertions: the numbers belong in docs/benchmarks.md and
docs/reliability.md, not in a test on a shared machine.

* Chaos (bench/chaos, issue 8): 40 steps, one kill per mode, so no save-timed
  kill (those are the second, fourth, ... of a mode; a naive restart loop does
  not survive them), and the one kill avoids saving steps. Four modes cover
  both of its runners and every kind of kill: `ftsup` (the memory tier and the
  standby, on by default), `ftsup_cold`, `baseline_guarded` (the restart loop)
  and `daemon_kill`. `ftsup_disk`, `ftsup_2standby` and `baseline` differ from
  those only by a line of the job file or of the loop.
* Faults (bench/faults, issue 12) in its `--quick` size: every category runs
  against a real daemon and finds no crash, no lost run, no quarantined valid
  checkpoint. The suite judges each case itself (docs/reliability.md); this
  asserts the table's invariants and that every category really tried
  something, so that a category that silently stopped injecting its fault
  cannot pass. Its deadlines (a CLI that does not answer, a run that does not
  end) are generous and belong to each case's judgement.

The three invocations (chaos, and the fault categories in two halves) run side
by side: each has its own daemons and folders, and each keeps about one core
or less busy, so together they take about as long as the longest one alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHAOS_MODES = ("ftsup", "ftsup_cold", "baseline_guarded", "daemon_kill")
CHAOS_KEYS = {
    "completed",
    "kills",
    "kills_in_save",
    "wall_s",
    "goodput",
    "goodput_after_first_step",
    "kill_to_step_mean_s",
    "kill_to_step_worst_s",
    "kill_to_step_s",
    "kill_to_step_parts_s",
    "steps_lost",
    "attempts",
}
CATEGORIES = {
    "jobfiles",
    "frames",
    "daemon_kill",
    "shim_kill",
    "disk_full",
    "descriptors",
    "database",
    "other_uid",
}
# Two halves of about equal length (seconds per category in a --quick report).
FAULT_HALVES = (
    ("descriptors", "jobfiles", "shim_kill", "other_uid"),
    ("database", "disk_full", "daemon_kill", "frames"),
)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _chaos(out: Path) -> subprocess.Popen[str]:
    argv = [str(REPO / "bench" / "chaos" / "run.py"), "--out", str(out)]
    argv += ["--steps", "40", "--save-steps", "10", "--kills", "1", "--timeout", "150"]
    return _start([*argv, "--modes", ",".join(CHAOS_MODES)])


def _faults(out: Path, only: tuple[str, ...]) -> subprocess.Popen[str]:
    argv = [str(REPO / "bench" / "faults" / "run.py"), "--quick"]
    return _start([*argv, "--only", ",".join(only), "--json", str(out)])


def _finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    """Each invocation's (stdout, stderr); on a timeout every one left is stopped
    (both scripts kill what they started, and unmount, on SIGTERM) and the test fails."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        left = procs[len(outputs) :]
        for proc in left:
            proc.send_signal(signal.SIGTERM)
        tails = [proc.communicate(timeout=60) for proc in left]
        pytest.fail(f"timed out\n{[(o[-4000:], e[-4000:]) for o, e in tails]}")
    return outputs


def _check_chaos(proc: subprocess.Popen[str], output: tuple[str, str], out: Path) -> None:
    stdout, stderr = output
    assert proc.returncode == 0, stdout + stderr[-4000:]
    assert "| mode |" in stdout
    report = json.loads(out.read_text())
    assert report["config"]["steps"] == 40
    modes: dict[str, dict[str, Any]] = report["modes"]
    assert set(modes) == set(CHAOS_MODES)
    for name, mode in modes.items():
        assert set(mode) >= CHAOS_KEYS, (name, sorted(CHAOS_KEYS - set(mode)))
        assert mode["completed"] is True, (name, mode)
        assert mode["kills"] == 1, (name, mode)
        assert 0 < mode["goodput"] <= 1, (name, mode)
    assert modes["ftsup"]["attempts"] == 2
    assert modes["ftsup"]["memory_resumes"] == 1  # the tier is on for LoRA by default
    assert modes["ftsup_cold"]["attempts"] == 2
    assert modes["ftsup_cold"]["standby_takeovers"] == 0
    assert modes["baseline_guarded"]["attempts"] == 2
    assert modes["daemon_kill"]["attempts"] == 1  # the run survived the daemon
    assert modes["daemon_kill"]["daemon_restarts"] == 1


def _check_faults(
    procs: list[subprocess.Popen[str]], outputs: list[tuple[str, str]], outs: list[Path]
) -> None:
    categories = {}
    for out, half in zip(outs, FAULT_HALVES, strict=True):
        report = json.loads(out.read_text())
        assert report["quick"] is True
        assert set(report["categories"]) == set(half)
        categories.update(report["categories"])
    assert set(categories) == CATEGORIES
    failures = []
    for name, category in categories.items():
        counts = category["counts"]
        bad = [c for c in category["cases"] if c["outcome"] in ("crash", "data lost")]
        bad += [c for c in category["cases"] if c["quarantined_valid"]]
        if category["error"] or counts["crash"] or counts["data lost"] or bad:
            failures.append((name, category["error"], bad[:5]))
        assert counts["tried"] > 0, (name, category)
        assert counts["tried"] == sum(
            counts[o] for o in ("ok", "clear error", "crash", "data lost")
        )
    assert not failures, json.dumps(failures, indent=1)[-8000:]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert "| category | tried |" in stdout
        assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_benchmark_and_fault_suite_in_their_smallest_sizes(tmp_path: Path) -> None:
    assert {name for half in FAULT_HALVES for name in half} == CATEGORIES
    chaos_out = tmp_path / "chaos.json"
    fault_outs = [tmp_path / f"faults-{i}.json" for i in range(len(FAULT_HALVES))]
    procs = [_chaos(chaos_out)]
    procs += [_faults(out, half) for out, half in zip(fault_outs, FAULT_HALVES, strict=True)]
    outputs = _finish(procs, 540)
    _check_chaos(procs[0], outputs[0], chaos_out)
    _check_faults(procs[1:], outputs[1:], fault_outs)
