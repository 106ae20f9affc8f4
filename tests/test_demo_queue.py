"""`ftsup demo --queue`: four real LoRA runs share two simulated GPUs in a daemon of
the demo's own; one waits with its reason, a priority run preempts the preemptible
one, which resumes where it saved, and all four finish."""

from __future__ import annotations

import json

import pytest

from tests.supervisor_harness import Harness

STEPS = 40
# Up to four trainers and standbys share the CPU cores; torch's default of one thread
# per core then oversubscribes them and every step crawls (~130 s for the demo here,
# ~30 s with one thread each). Nothing asserted here depends on the thread count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_queue_demo_preempts_and_resumes_without_losing_a_step(harness: Harness) -> None:
    harness.env.update(ONE_THREAD)  # the demo's daemon, and its trainers, inherit it
    result = harness.cli("demo", "--queue", "--steps", str(STEPS), "--json", timeout=900)
    summary = json.loads(result.stdout)
    jobs = {job["job"]: job for job in summary["jobs"]}
    assert set(jobs) == {"q-low", "q-mid", "q-later", "q-urgent"}
    assert all(job["state"] == "finished" and job["steps"] == STEPS for job in jobs.values())
    first, second = jobs["q-low"]["attempt_steps"]  # preempted once, then resumed
    assert second["start_step"] == first["last_step"] > 0  # resumed where it saved
    assert second["resume_from"].endswith(f"checkpoint-{first['last_step']}")
    assert all(len(jobs[name]["attempt_steps"]) == 1 for name in ("q-mid", "q-later", "q-urgent"))
    assert jobs["q-low"]["preempted"] == ["preempted for q-urgent: saving, then back to the queue"]
    assert "needs 1 GPU: 0 used by q-low, 1 used by q-mid" in jobs["q-later"]["waited"]
    # The demo's daemon (its own state and socket) is shut down; no other was started.
    assert not (harness.runtime_dir / "demo-queue" / "ftsup.sock").exists()
    assert not (harness.runtime_dir / "ftsup.sock").exists()
