"""Formatting and the Braille chart: fixed widths, no crash on missing or odd values."""

from __future__ import annotations

import math

import pytest

from ftsup.tui import format as fmt
from ftsup.tui.model import ConnectionInfo
from ftsup.tui.widgets.connection_bar import bar_text
from ftsup.tui.widgets.line_chart import ChartSeries, render_chart


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "–"),
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (3599, "59m"),
        (3600, "1h00"),
        (3 * 86400 + 7200, "3d02"),
        (math.inf, "–"),
        (-5, "0s"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert fmt.duration(seconds) == text


def test_numbers_keep_nan_visible_and_widths_small() -> None:
    assert fmt.number(float("nan")) == "nan"
    assert fmt.number(1.23456) == "1.235"
    assert fmt.number(1e-5) == "1.00e-05"
    assert fmt.rate(123.4) == "123" and fmt.rate(0.456) == "0.46"
    assert fmt.size(1536) == "1.5K" and fmt.size(42 * 2**20) == "42M"
    assert [len(fmt.bar(f, 8)) for f in (None, 0, 0.33, 1, 7)] == [8] * 5
    assert fmt.bar(1, 4) == "████" and fmt.bar(0, 4) == "░░░░"
    assert fmt.step_of(5, None) == "5" and fmt.step_of(5, 10) == "5/10"


def test_chart_has_its_size_axes_and_markers() -> None:
    train = [(float(s), 10.0 / s) for s in range(1, 200)]
    evals = [(50.0, 0.4), (100.0, 0.2)]
    text = render_chart(
        [ChartSeries("train", train), ChartSeries("eval", evals, marker="×")], 60, 12, "loss"
    )
    lines = text.plain.split("\n")
    assert len(lines) == 12 and all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("loss") and "train" in lines[0] and "eval 0.2" in lines[0]
    assert lines[1].strip().startswith("10┤")
    assert lines[-1].strip().startswith("└step 1") and lines[-1].endswith("199")
    assert text.plain.count("×") == 2 + 1  # two markers and the legend


def test_chart_copes_with_nothing_one_point_flat_and_nan() -> None:
    assert "no data" in render_chart([ChartSeries("x", [])], 40, 6).plain
    assert render_chart([ChartSeries("x", [(1.0, 2.0)])], 40, 6).plain.count("\n") == 5
    flat = render_chart([ChartSeries("x", [(1.0, 2.0), (2.0, 2.0), (3.0, math.nan)])], 40, 6)
    assert "2.1┤" in flat.plain and "1.9┤" in flat.plain
    assert render_chart([ChartSeries("x", [(1.0, 1.0)])], 5, 2).plain  # tiny: no crash


def test_connection_bar_fits_80_columns_in_every_state() -> None:
    counts = {"running": 12, "failing": 3, "finished": 140, "stopped": 7}
    reconnecting = ConnectionInfo(
        state="reconnecting",
        attempt=4,
        retry_in=2.0,
        reason="no daemon answers on /run/user/1000/ftsup/ftsup.sock",
    )
    for info in (
        ConnectionInfo(state="connected", daemon={"daemon_pid": 123456}),
        reconnecting,
        ConnectionInfo(),
    ):
        text = bar_text(info, counts, 78).plain
        assert len(text) <= 78
        assert "12 run" in text and "140" in text
    assert "reconnecting… try 5 in 2.0s" in bar_text(reconnecting, counts, 78).plain


def test_job_header_shows_goodput_advice_and_standby() -> None:
    from ftsup.tui.widgets.job_header import goodput_text

    info = {
        "goodput": {
            "goodput": 0.869,
            "wall_s": 149.3,
            "checkpoint_stall_s": 1.1,
            "restart_downtime_s": 11.2,
            "recomputed_s": 7.3,
            "checkpoint_advice": {"recommended_steps": 11, "configured_steps": 20},
        },
        "standby": {"state": "ready", "pid": 7},
    }
    assert goodput_text(info).plain == (
        "goodput 87% of 2m · stall 1s · downtime 11s · redo 7s"
        " · advice: checkpoint every 11 steps (now 20) · standby ready"
    )
    assert goodput_text({"goodput": None, "standby": None}).plain == ""
    assert goodput_text({"standby": {"state": "warming"}}).plain == "standby warming"


def test_job_header_says_goodput_is_unknown_never_zero() -> None:
    from ftsup.tui.widgets.job_header import goodput_text

    reason = "no timed step seen yet (the command writes no progress lines)"
    info = {
        "goodput": {"goodput": None, "wall_s": 35.0, "unknown": reason},
        "standby": None,
    }
    text = goodput_text(info).plain
    assert text == f"goodput unknown over 35s ({reason})"
    assert "0%" not in text


def test_job_header_shows_a_multi_node_jobs_nodes_and_what_it_waits_for() -> None:
    """The job screen's nodes line: the status's `waiting_for_nodes` and `nodes`
    view (each node's last record), a stale record with its age."""
    from ftsup.tui.widgets.job_header import nodes_text

    info = {
        "waiting_for_nodes": "waiting for nodes: rendezvous ftsup-mn at n1:29400 needs 2 node(s)",
        "nodes": {
            "nodes": [
                {"node": "n1-aa", "state": "running", "step": 1730, "age_s": 2.0, "self": True},
                {"node": "n2-bb", "state": "running", "step": 1702, "age_s": 240.0},
            ],
            "error": None,
        },
    }
    assert nodes_text(info, 0.0).plain == (
        "waiting for nodes: rendezvous ftsup-mn at n1:29400 needs 2 node(s)"
        " · n1-aa running step 1730 · n2-bb running step 1702 (4m ago)"
    )
    assert nodes_text({"nodes": None, "waiting_for_nodes": None}, 0.0).plain == ""
