"""The fault suite (bench/faults, issue 12) in its --quick size: every category runs
against a real daemon and finds no crash, no lost run, no quarantined valid checkpoint.

The suite judges each case itself (see docs/reliability.md); this test asserts the
table's invariants and that every category really tried something, so that a
category that silently stopped injecting its fault cannot pass. No timing
assertions: the suite's own deadlines (a CLI that does not answer, a run that does
not end) are generous and belong to the judgement of each case.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fault_suite_quick(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    argv = [
        sys.executable,
        str(REPO / "bench" / "faults" / "run.py"),
        "--quick",
        "--json",
        str(out),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.py kills what it started and unmounts on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the fault suite timed out\n{stdout[-4000:]}\n{stderr[-4000:]}")

    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert set(report["categories"]) == CATEGORIES
    failures = []
    for name, category in report["categories"].items():
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
    assert "| category | tried |" in stdout
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
