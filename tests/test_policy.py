"""The restart policy is a pure function: every branch on its own."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ftsup.supervisor.policy import (
    AttemptOutcome,
    Done,
    GiveUp,
    OtherNodes,
    Restart,
    Stopped,
    backoff_delay,
    consecutive_failures_without_progress,
    decide,
)
from ftsup.supervisor.spec_types import RestartSection

POLICY = RestartSection(max_restarts=5, backoff=10, backoff_max=60, crash_loop=3)


def crash(start: int, last: int, **kw: object) -> AttemptOutcome:
    return AttemptOutcome(returncode=1, signal=None, start_step=start, last_step=last, **kw)  # type: ignore[arg-type]


def test_exit_0_is_done() -> None:
    assert isinstance(decide([AttemptOutcome(0, None, 0, 100)], POLICY), Done)


def test_exit_2_gives_up_at_once() -> None:
    decision = decide([AttemptOutcome(2, None, 0, 0)], POLICY)
    assert isinstance(decision, GiveUp) and "configuration error" in decision.reason


def test_exit_75_resumes_immediately_unless_stop_was_requested() -> None:
    assert decide([AttemptOutcome(75, None, 0, 40)], POLICY) == Restart(
        0.0, "the trainer saved and stopped (exit code 75): resuming"
    )
    stopped = decide([AttemptOutcome(75, None, 0, 40, stop_requested=True)], POLICY)
    assert isinstance(stopped, Stopped) and "saved and stopped" in stopped.reason


def test_kill_after_stop_request_is_stopped_not_failed() -> None:
    outcome = AttemptOutcome(None, 9, 0, 40, stop_requested=True)
    assert isinstance(decide([outcome], POLICY), Stopped)


def test_hang_kill_is_a_failure_even_though_ftsup_stopped_it() -> None:
    outcome = AttemptOutcome(None, 9, 0, 40, stop_requested=True, failure_kind="hang")
    assert isinstance(decide([outcome], POLICY), Restart)


def test_backoff_doubles_per_stalled_failure_and_is_capped() -> None:
    history = [crash(0, 10)]
    assert decide(history, POLICY) == Restart(0.0, decide(history, POLICY).reason)  # type: ignore[union-attr]
    history.append(crash(10, 10))
    assert decide(history, POLICY).after == 10.0  # type: ignore[union-attr]
    history.append(crash(10, 10))
    assert decide(history, POLICY).after == 20.0  # type: ignore[union-attr]
    assert backoff_delay(10, POLICY) == 60.0


def test_a_failure_after_progress_restarts_at_once() -> None:
    history = [crash(0, 10), crash(10, 10), crash(10, 25)]
    decision = decide(history, POLICY)
    assert isinstance(decision, Restart) and decision.after == 0.0
    assert decision.reason.endswith("restart 3 of 5 at once (it made progress)"), decision.reason


def test_crash_loop_counts_failures_that_get_no_further() -> None:
    # Resumes at 10, crashes at 12 every time: steps advance, but never past 12.
    history = [crash(0, 12), crash(10, 12), crash(10, 12), crash(10, 12)]
    assert consecutive_failures_without_progress(history) == 3
    decision = decide(history, POLICY)
    assert isinstance(decision, GiveUp) and decision.reason.startswith("crash loop: 3 failures")


def test_max_restarts() -> None:
    history = [crash(i * 10, i * 10 + 5) for i in range(6)]
    decision = decide(history, POLICY)
    assert isinstance(decision, GiveUp) and "restart limit reached" in decision.reason
    assert isinstance(decide(history[:5], POLICY), Restart)


outcomes = st.builds(
    AttemptOutcome,
    returncode=st.sampled_from([0, 1, 2, 75, 137, None]),
    signal=st.sampled_from([None, 9, 11, 15]),
    start_step=st.integers(0, 100),
    last_step=st.integers(0, 200),
    stop_requested=st.booleans(),
    failure_kind=st.sampled_from([None, "hang", "cuda_oom"]),
)


@given(st.lists(outcomes, min_size=1, max_size=30))
def test_decide_always_answers_and_restarts_are_bounded(history: list[AttemptOutcome]) -> None:
    decision = decide(history, POLICY)
    assert isinstance(decision, Restart | GiveUp | Done | Stopped)
    if isinstance(decision, Restart):
        assert 0 <= decision.after <= POLICY.backoff_max
        if history[-1].is_failure:  # a clean save-and-stop (75) resumes whatever came before
            assert sum(1 for o in history if o.is_failure) <= POLICY.max_restarts


def test_a_multi_node_job_counts_its_failures_with_the_other_nodes() -> None:
    """Every failure ends the attempt on every node: the job's count is the highest
    any node has (a node that rejoined late does not get a fresh budget)."""
    own = [crash(0, 10), crash(10, 20)]  # two failures, both made progress
    assert isinstance(decide(own, POLICY), Restart)
    assert isinstance(decide(own, POLICY, OtherNodes(failures=5)), Restart)  # 5 restarts allowed
    over = decide(own, POLICY, OtherNodes(failures=6))
    assert isinstance(over, GiveUp) and "counted on all nodes" in over.reason
    said = decide(own, POLICY, OtherNodes(failures=4))
    assert isinstance(said, Restart) and "restart 4 of 5, counted on all nodes" in said.reason
    # fewer elsewhere: this node's own count stands, and nothing says otherwise
    assert "counted on all nodes" not in decide(own, POLICY, OtherNodes(failures=1)).reason


def test_a_crash_loop_seen_on_another_node_ends_the_job_here_too() -> None:
    own = [crash(0, 10), crash(10, 10)]  # one stalled failure here
    assert isinstance(decide(own, POLICY, OtherNodes(failures=2, stalled=2)), Restart)
    looped = decide(own, POLICY, OtherNodes(failures=3, stalled=3))
    assert isinstance(looped, GiveUp) and looped.reason.startswith("crash loop: 3 failures")
