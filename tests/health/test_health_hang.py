"""Hang timeouts: steady runs (fast, slow, with long saves) are never hung; silence is."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from ftsup.supervisor.health.hang import HangDetector, HangPolicy
from ftsup.supervisor.spec_types import HealthSection


def test_reason_names_the_rule() -> None:
    detector = HangDetector(HangPolicy(floor=60, ceiling=3600), started_at=0)
    for step in range(1, 11):
        detector.step(step, at=100 + 30 * step)
    assert detector.is_hung(400 + 300) is None
    verdict = detector.is_hung(400 + 312)
    assert verdict is not None
    assert verdict.reason == "no progress for 312 s; timeout 300 s = 10 x median step 30 s"
    assert (verdict.phase, verdict.timeout_s) == ("training", 300)


def test_floor_and_ceiling() -> None:
    fast = HangDetector(HangPolicy(floor=120, ceiling=3600), started_at=0)
    for step in range(1, 20):
        fast.step(step, at=float(step))
    assert fast.timeout() == (120, "floor (10 x median step 1.0 s = 10 s)")
    slow = HangDetector(HangPolicy(floor=120, ceiling=3600), started_at=0)
    for step in range(1, 5):
        slow.step(step, at=600.0 * step)
    assert slow.timeout() == (3600, "ceiling (10 x median step 600 s = 6000 s)")


def test_startup_timeout_before_the_first_step() -> None:
    detector = HangDetector(HangPolicy(startup_timeout=1800), started_at=1000)
    assert detector.is_hung(2800) is None
    verdict = detector.is_hung(2805)
    assert verdict is not None and verdict.phase == "startup"
    assert verdict.reason == "no first step after 1805 s; startup timeout 1800 s"


def test_heartbeats_are_progress_but_do_not_shape_the_median() -> None:
    detector = HangDetector(HangPolicy(floor=10, ceiling=1000), started_at=0)
    for step in range(1, 6):
        detector.step(step, at=20.0 * step)
    for beat in range(1, 50):
        detector.heartbeat(100 + beat)  # alive, but no step
    assert detector.timeout()[0] == 200
    assert detector.is_hung(149 + 200) is None
    assert detector.is_hung(149 + 201) is not None


def test_saving_uses_the_save_median() -> None:
    detector = HangDetector(HangPolicy(floor=10, ceiling=10_000), started_at=0)
    now = 0.0
    for step in range(1, 30):
        now += 5
        detector.step(step, at=now)
        if step % 10 == 0:
            detector.checkpoint_started(now)
            now += 100
            detector.checkpoint_finished(now)
    detector.checkpoint_started(now)
    assert detector.timeout() == (1000, "10 x median save 100 s")
    verdict = detector.is_hung(now + 1001)
    assert verdict is not None and verdict.phase == "checkpoint"
    assert "while saving a checkpoint" in verdict.reason


def test_fixed_timeout() -> None:
    policy = HangPolicy.from_spec(HealthSection(hang_timeout=300, startup_timeout=900))
    detector = HangDetector(policy, started_at=0)
    detector.step(1, at=800)
    assert detector.timeout() == (300, "configured hang_timeout")
    assert detector.is_hung(1100) is None
    assert detector.is_hung(1101) is not None


def test_a_repeated_step_is_a_heartbeat() -> None:
    detector = HangDetector(HangPolicy(floor=1, ceiling=100), started_at=0)
    for step in (1, 2, 3):
        detector.step(step, at=step * 2.0)
    detector.step(3, at=50)
    assert detector.timeout() == (20, "10 x median step 2.0 s")
    assert detector.is_hung(69) is None


# --- properties -------------------------------------------------------------------------


@dataclass
class Run:
    policy: HangPolicy
    first_step: float
    interval: float
    jitter: list[float]
    save_every: int
    save_s: float
    save_jitter: list[float]


@st.composite
def steady_runs(draw: st.DrawFn) -> Run:
    floor = draw(st.floats(1, 600))
    ceiling = draw(st.floats(floor, 20_000))
    policy = HangPolicy(
        multiple=draw(st.floats(4, 20)),
        floor=floor,
        ceiling=ceiling,
        startup_timeout=draw(st.floats(1, 5000)),
    )
    steps = draw(st.integers(1, 120))
    return Run(
        policy=policy,
        first_step=draw(st.floats(0, policy.startup_timeout)),
        # Steps and saves from 1 ms to 40% of the ceiling ("slow but steady"), x0.5-2 jitter.
        interval=draw(st.floats(0.001, ceiling / 2.5)),
        jitter=draw(st.lists(st.floats(0.5, 2.0), min_size=steps, max_size=steps)),
        save_every=draw(st.integers(0, 30)),
        save_s=draw(st.floats(0.001, ceiling / 2.5)),
        save_jitter=draw(st.lists(st.floats(0.5, 2.0), min_size=steps, max_size=steps)),
    )


def _assert_alive_until(detector: HangDetector, at: float) -> None:
    # The worst moment is just before the next record arrives.
    assert detector.is_hung(at) is None, (detector.timeout(), at)


@settings(max_examples=300, deadline=None)
@given(steady_runs())
def test_a_steady_run_is_never_hung(run: Run) -> None:
    detector = HangDetector(run.policy, started_at=0.0)
    now = run.first_step
    _assert_alive_until(detector, now)
    for index, factor in enumerate(run.jitter, start=1):
        detector.step(index, at=now)
        if run.save_every and index % run.save_every == 0:
            detector.checkpoint_started(now)
            now += run.save_s * run.save_jitter[index - 1]
            _assert_alive_until(detector, now)
            detector.checkpoint_finished(now)
        now += run.interval * factor
        _assert_alive_until(detector, now)


@settings(max_examples=200, deadline=None)
@given(steady_runs(), st.floats(1.0001, 50))
def test_silence_past_the_timeout_is_hung(run: Run, overshoot: float) -> None:
    detector = HangDetector(run.policy, started_at=0.0)
    now = run.first_step
    for index, factor in enumerate(run.jitter, start=1):
        detector.step(index, at=now)
        now += run.interval * factor
    last = now - run.interval * run.jitter[-1]
    limit, _ = detector.timeout()
    assert run.policy.floor <= limit <= run.policy.ceiling
    verdict = detector.is_hung(last + limit * overshoot)
    assert verdict is not None
    assert verdict.reason.startswith("no progress for ")


def test_waiting_for_nodes_has_no_timeout_and_startup_counts_from_the_join() -> None:
    """A multi-node launcher waiting in the rendezvous for a node that is gone is
    not hung, however long; once every node joined, the start-up timeout runs."""
    policy = HangPolicy(startup_timeout=100)
    detector = HangDetector(policy, started_at=0)
    detector.waiting_for_nodes(5)
    assert detector.is_hung(10_000) is None
    detector.heartbeat(10_000)  # `joined`: every node is there
    assert detector.is_hung(10_099) is None
    verdict = detector.is_hung(10_101)
    assert verdict is not None and verdict.phase == "startup"
    detector.waiting_for_nodes(10_200)  # the next attempt's launcher waits again
    detector.step(1, 10_210)  # ... and a step ends the wait as well
    assert detector.is_hung(10_210 + 10 * policy.ceiling) is not None
