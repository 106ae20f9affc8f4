"""The chaos benchmark keeps working: its smallest configuration runs, every mode completes.

No timing assertions: the numbers belong in docs/benchmarks.md, not in a test
on a shared machine. One kill per mode, so no save-timed kill (those are the
second, fourth, ... of a mode; a naive restart loop does not survive them),
and the one kill avoids saving steps.

The modes run as two invocations side by side (`--modes`): each mode has its own
daemon or restart loop and folders, the kill plan comes from the same seed in both,
and one invocation keeps about one core busy, so the pair takes about half the wall
time of one invocation of all six.
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
MODES = ("ftsup", "ftsup_disk", "ftsup_cold", "baseline", "baseline_guarded", "daemon_kill")
HALVES = (("ftsup", "ftsup_disk", "ftsup_cold"), ("baseline", "baseline_guarded", "daemon_kill"))
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


def _start(out: Path, modes: tuple[str, ...]) -> subprocess.Popen[str]:
    argv = [sys.executable, str(REPO / "bench" / "chaos" / "run.py"), "--out", str(out)]
    argv += ["--steps", "40", "--save-steps", "10", "--kills", "1", "--timeout", "150"]
    argv += ["--modes", ",".join(modes)]
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
        for proc in left:  # run.py kills everything it started on SIGTERM
            proc.send_signal(signal.SIGTERM)
        tails = [proc.communicate(timeout=30)[1][-4000:] for proc in left]
        pytest.fail(f"the benchmark timed out\n{tails}")
    return outputs


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_smallest_configuration(tmp_path: Path) -> None:
    assert set(MODES) == {mode for half in HALVES for mode in half}
    outs = [tmp_path / f"chaos-{i}.json" for i in range(len(HALVES))]
    procs = [_start(out, half) for out, half in zip(outs, HALVES, strict=True)]
    outputs = _finish(procs, 220)
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stdout + stderr[-4000:]
        assert "| mode |" in stdout

    modes: dict[str, dict[str, Any]] = {}
    for out, half in zip(outs, HALVES, strict=True):
        report = json.loads(out.read_text())
        assert report["config"]["steps"] == 40
        assert set(report["modes"]) == set(half)
        modes.update(report["modes"])
    assert set(modes) == set(MODES)
    for name, mode in modes.items():
        assert set(mode) >= KEYS, (name, sorted(KEYS - set(mode)))
        assert mode["completed"] is True, (name, mode)
        assert mode["kills"] == 1, (name, mode)
        assert 0 < mode["goodput"] <= 1, (name, mode)
    assert modes["ftsup"]["attempts"] == 2
    assert modes["ftsup"]["memory_resumes"] == 1  # the tier is on for LoRA by default
    assert modes["ftsup_disk"]["attempts"] == 2
    assert modes["ftsup_disk"]["memory_resumes"] == 0
    assert modes["ftsup_cold"]["attempts"] == 2
    assert modes["ftsup_cold"]["standby_takeovers"] == 0
    assert modes["baseline"]["attempts"] == 2
    assert modes["baseline_guarded"]["attempts"] == 2
    assert modes["daemon_kill"]["attempts"] == 1  # the run survived the daemon
    assert modes["daemon_kill"]["daemon_restarts"] == 1
