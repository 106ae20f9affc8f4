"""The fault suite (bench/faults, issue 12) in its --quick size: every category runs
against a real daemon and finds no crash, no lost run, no quarantined valid checkpoint.

The suite judges each case itself (see docs/reliability.md); this test asserts the
table's invariants and that every category really tried something, so that a
category that silently stopped injecting its fault cannot pass. No timing
assertions: the suite's own deadlines (a CLI that does not answer, a run that does
not end) are generous and belong to the judgement of each case.

The categories run as two invocations side by side (`--only`): each category has
its own daemon and folders, and one invocation keeps less than one core busy, so
the pair takes about half the wall time of one invocation of all eight.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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
HALVES = (
    ("descriptors", "jobfiles", "shim_kill", "other_uid"),
    ("database", "disk_full", "daemon_kill", "frames"),
)


def _start(out: Path, only: tuple[str, ...]) -> subprocess.Popen[str]:
    argv = [sys.executable, str(REPO / "bench" / "faults" / "run.py"), "--quick"]
    argv += ["--only", ",".join(only), "--json", str(out)]
    return subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    """Each invocation's (stdout, stderr); on a timeout every one is stopped and the test fails."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        left = procs[len(outputs) :]
        for proc in left:  # run.py kills what it started and unmounts on SIGTERM
            proc.send_signal(signal.SIGTERM)
        tails = [proc.communicate(timeout=60) for proc in left]
        pytest.fail(f"the fault suite timed out\n{[(o[-4000:], e[-4000:]) for o, e in tails]}")
    return outputs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fault_suite_quick(tmp_path: Path) -> None:
    assert set(CATEGORIES) == {name for half in HALVES for name in half}
    outs = [tmp_path / f"faults-{i}.json" for i in range(len(HALVES))]
    procs = [_start(out, half) for out, half in zip(outs, HALVES, strict=True)]
    outputs = _finish(procs, 540)

    categories = {}
    for out, half in zip(outs, HALVES, strict=True):
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
