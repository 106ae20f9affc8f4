"""Loss anomalies: NaN/inf and spikes, with the data window to skip on rollback."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftsup.supervisor.health.loss import LossAnomalyDetector


def test_nan_names_the_window_since_the_last_good_step() -> None:
    detector = LossAnomalyDetector()
    for step in range(10, 110, 10):  # logging_steps = 10
        assert detector.observe(step, 2.0 - step / 1000) is None
    anomaly = detector.observe(110, math.nan)
    assert anomaly is not None
    assert (anomaly.kind, anomaly.skip_from, anomaly.skip_to) == ("nan", 101, 110)
    assert anomaly.reason == "loss is nan at step 110; skip the data of steps 101-110"


def test_inf_at_the_first_step() -> None:
    anomaly = LossAnomalyDetector().observe(1, math.inf)
    assert anomaly is not None
    assert (anomaly.kind, anomaly.skip_from, anomaly.skip_to) == ("inf", 1, 1)
    assert anomaly.reason.endswith("skip the data of step 1")


def test_spike_over_the_median() -> None:
    detector = LossAnomalyDetector(spike_factor=5, window=20, min_history=5)
    for step in range(1, 21):
        assert detector.observe(step, 1.0 + (step % 3) * 0.1) is None
    assert detector.observe(21, 5.4) is None  # 5.4 < 5 x 1.1
    anomaly = detector.observe(22, 9.0)
    assert anomaly is not None and anomaly.kind == "spike"
    assert anomaly.median == pytest.approx(1.1)
    assert anomaly.reason == (
        "loss 9 at step 22 is 8.2 x the median 1.1 of the last 20 logged steps (limit 5 x); "
        "skip the data of step 22"
    )


def test_no_spike_judgement_without_history() -> None:
    detector = LossAnomalyDetector(min_history=10)
    for step in range(1, 10):
        detector.observe(step, 0.01)
    assert detector.observe(10, 100.0) is None  # only 9 values before it


def test_anomalies_do_not_enter_the_history() -> None:
    detector = LossAnomalyDetector(spike_factor=3, min_history=3)
    for step in range(1, 6):
        detector.observe(step, 1.0)
    assert detector.observe(6, math.nan) is not None
    assert detector.observe(7, 50.0) is not None  # still judged against 1.0
    assert detector.median() == 1.0
    anomaly = detector.observe(8, 40.0)
    assert anomaly is not None and (anomaly.skip_from, anomaly.skip_to) == (6, 8)


def test_reset_after_rollback() -> None:
    detector = LossAnomalyDetector(min_history=2)
    detector.observe(1, 1.0)
    detector.observe(2, 1.0)
    detector.reset()
    assert detector.median() is None
    assert detector.observe(3, 50.0) is None


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1e-4, 1e4),
    st.lists(st.floats(0.5, 2.0), min_size=1, max_size=300),
    st.floats(4.0, 50.0),
)
def test_a_noisy_but_sane_loss_is_never_an_anomaly(
    level: float, noise: list[float], factor: float
) -> None:
    detector = LossAnomalyDetector(spike_factor=factor, window=30, min_history=5)
    for step, scale in enumerate(noise, start=1):
        assert detector.observe(step, level * scale) is None
