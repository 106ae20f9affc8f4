"""The chaos benchmark keeps working: its smallest configuration runs, every mode completes.

No timing assertions: the numbers belong in docs/benchmarks.md, not in a test
on a shared machine. One kill per mode, so no save-timed kill (those are the
second, fourth, ... of a mode; a naive restart loop does not survive them),
and the one kill avoids saving steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODES = ("ftsup", "ftsup_cold", "baseline", "baseline_guarded", "daemon_kill")
KEYS = {
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_smallest_configuration(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    argv = [sys.executable, str(REPO / "bench" / "chaos" / "run.py"), "--out", str(out)]
    argv += ["--steps", "40", "--save-steps", "10", "--kills", "1", "--timeout", "150"]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=220)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.py kills everything it started on SIGTERM
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the benchmark timed out\n{stderr[-4000:]}")
    assert proc.returncode == 0, stdout + stderr[-4000:]

    report = json.loads(out.read_text())
    assert report["config"]["steps"] == 40
    assert set(report["modes"]) == set(MODES)
    for name, mode in report["modes"].items():
        assert set(mode) >= KEYS, (name, sorted(KEYS - set(mode)))
        assert mode["completed"] is True, (name, mode)
        assert mode["kills"] == 1, (name, mode)
        assert 0 < mode["goodput"] <= 1, (name, mode)
    assert report["modes"]["ftsup"]["attempts"] == 2
    assert report["modes"]["ftsup_cold"]["attempts"] == 2
    assert report["modes"]["ftsup_cold"]["standby_takeovers"] == 0
    assert report["modes"]["baseline"]["attempts"] == 2
    assert report["modes"]["baseline_guarded"]["attempts"] == 2
    assert report["modes"]["daemon_kill"]["attempts"] == 1  # the run survived the daemon
    assert report["modes"]["daemon_kill"]["daemon_restarts"] == 1
    assert "| mode |" in stdout
