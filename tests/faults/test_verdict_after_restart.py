"""A daemon killed between recording an attempt's exit and giving its verdict
(found by bench/faults: daemon SIGKILLs). The next daemon must judge that exit,
not launch the run once more: a finished run was started again from its last
checkpoint, a stopped one trained on."""

from __future__ import annotations

import sqlite3

from tests.supervisor_harness import Harness


def _forget_the_verdict(h: Harness, job: str, state: str) -> None:
    """The database as the daemon left it if killed right after `update_attempt`
    (the exit is recorded) and before `set_job_state` (the verdict). The row is
    made newer than its runs/ copy, so it is what the next daemon trusts."""
    db = sqlite3.connect(h.state_dir / "ftsup.db")
    try:
        db.execute("UPDATE jobs SET state=?, updated_at=updated_at+1000 WHERE name=?", (state, job))
        db.commit()
    finally:
        db.close()


def test_an_exit_recorded_without_a_verdict_is_judged_not_relaunched(harness: Harness) -> None:
    h = harness
    h.start_daemon()
    h.cli("start", str(h.toy_job("once", "--max-steps", "12", "--save-steps", "4")))
    done = h.wait_state("once", "finished", "failed", "gave_up")
    assert done["state"] == "finished" and done["attempts"] == 1
    h.kill_daemon()
    _forget_the_verdict(h, "once", "running")

    h.start_daemon()
    again = h.wait_state("once", "finished", "failed", "gave_up")
    assert again["state"] == "finished"
    # Before the fix the new daemon launched attempt 2 (from checkpoint-12).
    assert again["attempts"] == 1, again
    assert h.steps("once") == list(range(1, 13))  # every step once, none again


def test_a_stop_recorded_without_a_verdict_stays_stopped(harness: Harness) -> None:
    h = harness
    h.start_daemon()
    h.cli("start", str(h.toy_job("halt", "--max-steps", "100000", "--save-steps", "5")))
    h.wait_state("halt", "running")
    h.cli("stop", "halt")
    stopped = h.wait_state("halt", "stopped", "failed", "gave_up")
    assert stopped["state"] == "stopped"
    h.kill_daemon()
    _forget_the_verdict(h, "halt", "stopping")

    h.start_daemon()
    again = h.wait_state("halt", "stopped", "failed", "gave_up", "running")
    assert again["state"] == "stopped" and again["attempts"] == 1, again
