"""The daemon as a service: READY after the socket, watchdog pings, notifications to a
real HTTP receiver, metrics scraped from a running job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

from tests.supervisor_harness import Harness, wait_for


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn_daemon(harness: Harness, *args: str, env: dict[str, str] | None = None) -> None:
    harness.state_dir.mkdir(parents=True, exist_ok=True)
    harness.daemon = subprocess.Popen(
        [sys.executable, "-m", "ftsup.supervisor", "daemon", *args],
        env=env or harness.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_ready_after_the_socket_watchdog_pings_and_trainers_never_see_notify_socket(
    harness: Harness,
) -> None:
    notify_path = harness.root / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(20)
    env = {**harness.env, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    _spawn_daemon(harness, env=env)
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
        # READY is sent only once the socket answers and runs are re-adopted.
        assert harness.cli("ls", check=False).returncode == 0
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready and "running" in ready
        pings = 0
        while pings < 2:
            if "WATCHDOG=1" in receiver.recv(4096).decode():
                pings += 1
        probe = harness.work / "probe.toml"
        probe.write_text(
            f'[job]\nname = "envprobe"\noutput_dir = "{harness.work / "p"}"\n[command]\n'
            f'argv = ["{sys.executable}", "-c", "import os; '
            "print('NOTIFY', os.environ.get('NOTIFY_SOCKET'), os.environ.get('WATCHDOG_USEC'))\"]\n"
        )
        harness.cli("start", str(probe))
        harness.wait_state("envprobe", "finished", "gave_up", "failed")
        assert "NOTIFY None None" in harness.cli("logs", "envprobe").stdout
    finally:
        receiver.close()


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_is_told_when_a_job_gives_up_and_when_one_finishes(daemon: Harness) -> None:
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        notify = f'\n[notify]\nwebhook = "{url}"\non = ["finished", "gave_up"]\n'
        ok = daemon.toy_job("happy", "--max-steps", "3", extra=notify)
        bad = daemon.toy_job(
            "doomed", "--crash-always-at", "1", restart="crash_loop = 2", extra=notify
        )
        daemon.cli("start", str(ok))
        daemon.cli("start", str(bad))
        wait_for(lambda: len(_Receiver.received) >= 2, 30, what="two notifications")
        by_job = {body["job"]: body for body in _Receiver.received}
        assert by_job["happy"]["event"] == "finished"
        assert by_job["doomed"]["event"] == "gave_up"
        assert "crash loop" in by_job["doomed"]["text"]
        wait_for(
            lambda: (
                "notify_delivered"
                in [e["kind"] for e in daemon.cli_json("events", "doomed")["events"]]
            ),
            10,
            what="the delivery event",
        )
        assert len(_Receiver.received) == 2  # once per event, nothing for other events
    finally:
        server.shutdown()


def test_metrics_endpoint_serves_a_running_job(harness: Harness) -> None:
    port = _free_port()
    _spawn_daemon(harness, "--metrics-port", str(port))
    wait_for(lambda: harness.cli("ls", check=False).returncode == 0, 20, what="the daemon")
    job = harness.toy_job("metered", "--max-steps", "400", "--step-time", "0.05")
    harness.cli("start", str(job))
    wait_for(lambda: harness.status("metered")["progress"]["step"] >= 3, what="step 3")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    def step_line() -> list[str]:
        lines = [ln for ln in scrape().splitlines() if ln.startswith("ftsup_job_step{")]
        return lines if lines and float(lines[0].split()[-1]) >= 3 else []

    # The endpoint serves a snapshot the loop refreshes each second: wait for one
    # taken after step 3 (a stuck snapshot never gets there).
    lines = wait_for(step_line, 30, what="the scraped step to reach 3")
    assert lines[0].startswith('ftsup_job_step{job_name="metered"}')
    text = scrape()
    samples = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#"))
    assert 0 < float(samples['ftsup_job_goodput{job_name="metered"}']) <= 1
    assert float(samples['ftsup_job_time_seconds{job_name="metered",part="productive"}']) > 0
    assert 'ftsup_job_standby_ready{job_name="metered"}' not in samples  # a command job


def test_daemon_wide_notify_default_serves_jobs_without_their_own(harness: Harness) -> None:
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        harness.state_dir.mkdir(parents=True)
        (harness.state_dir / "daemon.toml").write_text(
            f'[notify]\nwebhook = "http://127.0.0.1:{server.server_port}/all"\non = ["finished"]\n'
        )
        harness.start_daemon()
        harness.cli("start", str(harness.toy_job("plain", "--max-steps", "2")))
        wait_for(lambda: _Receiver.received, 30, what="the default webhook")
        assert _Receiver.received[0]["job"] == "plain"
        assert _Receiver.received[0]["event"] == "finished"
    finally:
        server.shutdown()


def test_invalid_daemon_config_refuses_to_start_with_the_reason(harness: Harness) -> None:
    harness.state_dir.mkdir(parents=True)
    (harness.state_dir / "daemon.toml").write_text('[notfy]\nwebhook = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", "daemon"],
        env=harness.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "daemon.toml:1: [notfy]: not a daemon setting" in result.stderr
