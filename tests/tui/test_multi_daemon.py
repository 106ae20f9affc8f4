"""`ftsup tui --host n1 --host n2` (issue 17): one TUI over several daemons.

The rewriting (names `JOB@NODE`, event ids, GPU indices, `after_id`) is checked
on `RecordedSource`s (real answer shapes, no daemon); the app against two real
daemons that each run a job of the same name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from textual.message import Message
from textual.notifications import Notify

from ftsup.supervisor.cli import tui_cmd
from ftsup.supervisor.protocol import RequestError
from ftsup.tui.app import FtsupApp
from ftsup.tui.capture import screen_text
from ftsup.tui.connection import DaemonConnection
from ftsup.tui.messages import Connected, Disconnected
from ftsup.tui.model import TuiState
from ftsup.tui.multi import GPU_STRIDE, MultiSource
from ftsup.tui.recorded import RECORDING_FORMAT, RecordedSource
from ftsup.tui.screens.confirm import ConfirmScreen
from ftsup.tui.screens.dashboard import DashboardScreen
from ftsup.tui.screens.job import JobScreen
from ftsup.tui.ssh import TunnelError
from ftsup.tui.widgets.gpu_map import map_rows
from tests.supervisor_harness import Harness
from tests.tui.test_live import wait_until


# rewriting, on recorded answers ---------------------------------------------------
def recording(node: str, t0: float) -> dict[str, Any]:
    """What a daemon running `train` on GPU 0 answers (shapes as handlers.py gives them)."""

    def event(raw: int, ts: float, kind: str, job: str | None) -> dict[str, Any]:
        return {"id": raw, "ts": ts, "job": job, "kind": kind, "message": node, "data": {}}

    job = {"name": "train", "state": "running", "updated_at": t0, "gpu_devices": [0]}
    events = [event(1, t0, "submitted", "train"), event(2, t0 + 2, "attempt_started", "train")]
    answers = [
        ({"type": "status"}, {"jobs": [job], "counts": {"running": 1}, "degraded": None}),
        ({"type": "status", "job": "train"}, {**job, "output_dir": f"/out/{node}"}),
        ({"type": "events"}, {"events": events}),
        ({"type": "gpus"}, {"available": True, "status": "ok", "gpus": [{"index": 0}]}),
        ({"type": "queue"}, {"holding": [{"job": "train", "gpus": [0]}], "waiting": []}),
    ]
    return {
        "format": RECORDING_FORMAT,
        "recorded_at": t0 + 10,
        "target": node,
        "answers": [{"request": r, "result": a} for r, a in answers],
    }


def two_nodes() -> tuple[MultiSource, RecordedSource, RecordedSource]:
    a = RecordedSource(recording("a", 1000.0))
    b = RecordedSource(recording("b", 1001.0))  # b's events fall between a's
    return MultiSource({"a": a, "b": b}), a, b


async def test_names_ids_and_gpus_are_rewritten_and_requests_routed() -> None:
    multi, a, b = two_nodes()
    status = await multi.request("status")
    assert {j["name"]: j["gpu_devices"] for j in status["jobs"]} == {
        "train@a": [0],
        "train@b": [GPU_STRIDE],
    }
    history = (await multi.request("events", limit=300, after_id=0))["events"]
    ids = [e["id"] for e in history]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    assert [(e["job"], e["ts"]) for e in history] == [
        ("train@a", 1000.0),
        ("train@b", 1001.0),
        ("train@a", 1002.0),
        ("train@b", 1003.0),
    ]  # merged by time, not by each daemon's own numbering
    # after_id: each daemon is asked after the newest of ITS OWN ids handed out.
    await multi.request("events", limit=300, after_id=max(ids))
    assert a.requests[-1] == ("events", {"limit": 300, "after_id": 2})
    detail = await multi.request("status", job="train@b")
    assert detail["name"] == "train@b" and detail["output_dir"] == "/out/b"
    assert b.requests[-1] == ("status", {"job": "train"})
    assert ("status", {"job": "train"}) not in a.requests
    for bad in ("train@c", "train"):
        with pytest.raises(RequestError) as refused:
            await multi.request("stop", job=bad)
        assert refused.value.code == "not_found"
    with pytest.raises(RequestError, match="ftsup start"):
        await multi.request("start", spec_path="/x.toml", spec_text="")

    state = TuiState()  # the app's model keeps the two nodes' GPU 0 apart
    state.apply_status_list(status)
    state.apply_history(history)
    state.gpus.apply(await multi.request("gpus"), sample=False)
    state.apply_queue(await multi.request("queue"))
    assert sorted(state.jobs) == ["train@a", "train@b"]
    assert len(state.jobs["train@a"].events) == 2
    rows = map_rows(state.gpus, state.queue)
    assert [(r.label, r.holder) for r in rows] == [("a:0", "train@a"), ("b:0", "train@b")]


def test_one_node_down_keeps_the_others_connected() -> None:
    multi, _, _ = two_nodes()
    posted: list[Message] = []

    def post(message: Message) -> bool:
        posted.append(message)
        return True

    multi._post = post
    multi._relay("a", Connected({"daemon_pid": 1}))
    multi._relay("b", Connected({"daemon_pid": 2}))
    assert isinstance(posted[-1], Connected) and posted[-1].daemon["nodes"] == "a ✓  b ✓"
    posted.clear()
    multi._relay("b", Disconnected("the daemon closed the connection", 1, 0.25))
    connected = [m for m in posted if isinstance(m, Connected)]
    assert [m.daemon["nodes"] for m in connected] == ["a ✓  b reconnecting…"]
    assert connected[0].daemon["nodes_down"] == ["b"]
    assert any(isinstance(m, Notify) for m in posted)
    assert not any(isinstance(m, Disconnected) for m in posted)
    posted.clear()
    multi._relay("b", Disconnected("refused", 2, 0.5))  # retries of a node already down
    assert posted == []
    multi._relay("a", Disconnected("gone", 1, 0.25))  # now every node is down
    assert isinstance(posted[-1], Disconnected) and "a: gone" in posted[-1].reason


def test_cli_labels() -> None:
    daemons = tui_cmd.plan(
        ["me@n1", "you@n1", "n2"], ["x=/tmp/a.sock", "/run/ftsup/ftsup.sock", "/tmp/k=v/s.sock"]
    )
    assert [(d.label, d.host or str(d.socket)) for d in daemons] == [
        ("n1", "me@n1"),
        ("n1-2", "you@n1"),
        ("n2", "n2"),
        ("x", "/tmp/a.sock"),
        ("ftsup", "/run/ftsup/ftsup.sock"),
        ("k=v", "/tmp/k=v/s.sock"),
    ]
    parser = argparse.ArgumentParser()
    tui_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["tui", "--host", "me@n1", "--host", "n2", "--socket", "/x.sock"])
    assert args.host == ["me@n1", "n2"]
    assert args.func(args) == 2  # a bare --socket next to --host is refused


# the app against two real daemons -------------------------------------------------
def loop_job(harness: Harness, node: str) -> Path:
    """A `[command]` job named `loop` printing a line that names its node."""
    code = (
        "import sys, time\n"
        "for i in range(100000):\n"
        f"    print('tick', i, 'on node-{node}', flush=True)\n"
        "    time.sleep(0.2)\n"
    )
    output = harness.work / f"out-{node}"
    text = textwrap.dedent(f"""\
        [job]
        name = "loop"
        output_dir = "{output}"

        [command]
        argv = {json.dumps([sys.executable, "-c", code])}
        """)
    path = harness.work / "loop.toml"
    path.write_text(text)
    return path


def job_state(app: FtsupApp, name: str) -> str | None:
    model = app.state.jobs.get(name)
    return model.state if model is not None else None


async def test_one_tui_over_two_daemons(harness: Harness) -> None:
    second = Harness()
    try:
        await _two_daemons(harness, second)
    finally:
        second.cleanup()


async def _two_daemons(ha: Harness, hb: Harness) -> None:
    for node, h in (("a", ha), ("b", hb)):
        await asyncio.to_thread(h.start_daemon)
        await asyncio.to_thread(h.cli, "start", str(loop_job(h, node)))
    sources = {
        label: DaemonConnection(h.runtime_dir / "ftsup.sock", backoff_max=0.5)
        for label, h in (("a", ha), ("b", hb))
    }
    app = FtsupApp(MultiSource(sources))
    async with app.run_test(size=(120, 36)) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        await wait_until(
            pilot,
            lambda: job_state(app, "loop@a") == job_state(app, "loop@b") == "running",
            "both nodes' loop running",
        )
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "loop@a" in text and "loop@b" in text and "a ✓  b ✓" in text

        # b's job screen loads b's detail and log, not a's
        app.action_open_job("loop@b")
        screen = app.screen
        assert isinstance(screen, JobScreen)
        await asyncio.wait_for(screen.loaded.wait(), 20)
        detail = screen.job.detail or {}
        assert detail["output_dir"] == str(hb.work / "out-b")
        await wait_until(pilot, lambda: screen.job.log.lines, "b's log lines")
        lines = list(screen.job.log.lines)
        assert any("on node-b" in line for line in lines)
        assert not any("on node-a" in line for line in lines)

        # stop on the job screen reaches daemon b alone
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.actions_sent, "the stop request")
        assert list(app.actions_sent) == [("stop", {"job": "loop@b", "now": False})]
        await wait_until(pilot, lambda: job_state(app, "loop@b") == "stopped", "b's loop stopped")
        assert (await asyncio.to_thread(hb.status, "loop"))["state"] == "stopped"
        assert (await asyncio.to_thread(ha.status, "loop"))["state"] == "running"
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)

        # daemon b goes away: a stays connected and shown, b's absence is said
        await asyncio.to_thread(hb.kill_daemon)
        await wait_until(
            pilot,
            lambda: "b reconnecting…" in str(app.state.connection.daemon.get("nodes")),
            "b shown as reconnecting",
        )
        assert app.state.connection.state == "connected"
        await wait_until(pilot, lambda: "loop@b" not in app.state.jobs, "b's jobs hidden")
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "b reconnecting…" in text and "loop@a" in text
        assert job_state(app, "loop@a") == "running"

        # b is back: so is its job
        await asyncio.to_thread(hb.start_daemon)
        await wait_until(
            pilot, lambda: app.state.connection.daemon.get("nodes") == "a ✓  b ✓", "b back"
        )
        await wait_until(pilot, lambda: job_state(app, "loop@b") == "stopped", "b's job back")
        assert job_state(app, "loop@a") == "running"


FAKE_SSH = (sys.executable, str(Path(__file__).parent / "fake_ssh.py"))


def test_one_tunnel_per_host_all_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAKE_SSH_REMOTE_SOCKET", str(tmp_path / "remote.sock"))
    daemons = tui_cmd.plan(["me@n1", "me@n2"], [f"here={tmp_path / 'local.sock'}"])
    tunnels: list[Any] = []
    sources = tui_cmd.open_sources(daemons, None, [], tunnels, ssh=FAKE_SSH)
    try:
        assert list(sources) == ["n1", "n2", "here"]
        assert [t.host for t in tunnels] == ["me@n1", "me@n2"] and all(t.running() for t in tunnels)
        assert all(isinstance(s, DaemonConnection) for s in sources.values())
        sockets = {label: getattr(s, "socket_path", None) for label, s in sources.items()}
        assert len(set(sockets.values())) == 3 and sockets["here"] == tmp_path / "local.sock"
    finally:
        processes = [t.process for t in tunnels]
        tui_cmd.close_all(tunnels)
    assert all(p is not None and p.poll() is not None for p in processes)
    assert all(t.folder is None for t in tunnels)

    monkeypatch.setenv("FAKE_SSH_FAIL", "1")  # ssh refuses: the command ends, naming the host
    tunnels = []
    with pytest.raises(TunnelError, match=r"me@n1: .*Connection refused"):
        tui_cmd.open_sources(daemons, "/run/ftsup/ftsup.sock", [], tunnels, ssh=FAKE_SSH)
    assert all(t.process is None and t.folder is None for t in tunnels)
