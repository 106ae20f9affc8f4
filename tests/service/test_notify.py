"""Notifications against a real HTTP server and a real command hook."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.service.notify import (
    CommandHook,
    Notification,
    NotificationDispatcher,
    RetryPolicy,
    WebhookSender,
    senders_for,
)
from ftsup.supervisor.spec_types import NotifySection

from .conftest import Receiver

FAST = RetryPolicy(attempts=3, initial_delay=0.05, max_delay=0.2, timeout=10.0)
EVENT = Notification("failed", "qwen-lora", "exit status 1 at step 120", {"step": 120})

Records = list[tuple[str, str, dict[str, Any]]]


def recorder() -> tuple[Records, Any]:
    records: Records = []
    return records, lambda kind, message, data: records.append((kind, message, data))


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_body_suits_slack_discord_and_generic() -> None:
    body = EVENT.body()
    assert body["text"] == body["content"] == "ftsup: qwen-lora failed: exit status 1 at step 120"
    assert body["event"] == "failed" and body["job"] == "qwen-lora"
    assert body["data"] == {"step": 120}
    long = Notification("failed", "j", "x" * 5000).body()
    assert len(long["content"]) == 2000 and len(long["text"]) > 5000


def test_webhook_rejects_non_http() -> None:
    with pytest.raises(ValueError):
        WebhookSender("file:///etc/passwd")
    assert WebhookSender("https://hooks.slack.com/services/T/B/X").name == (
        "webhook https://hooks.slack.com"
    )


async def test_delivered_once_per_event(http_receiver: Receiver) -> None:
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        sender = WebhookSender(http_receiver.url)
        assert dispatcher.submit(EVENT, [sender]) == 1
        second = Notification("finished", "qwen-lora", "done", {"step": 3000})
        assert dispatcher.submit(second, [sender]) == 1
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert sorted(body["event"] for body in http_receiver.bodies) == ["failed", "finished"]
    assert [kind for kind, _, _ in records] == ["notify_delivered"] * 2
    assert all("SECRET" not in message for _, message, _ in records)


async def test_retried_after_500_then_delivered(http_receiver: Receiver) -> None:
    http_receiver.statuses = [500, 503]
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert len(http_receiver.bodies) == 3
    assert [kind for kind, _, _ in records] == ["notify_retry", "notify_retry", "notify_delivered"]
    assert records[-1][2]["attempt"] == 3
    assert "HTTP 500" in records[0][1]


async def test_dropped_with_a_record_after_retries(http_receiver: Receiver) -> None:
    http_receiver.statuses = [500] * 10
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert len(http_receiver.bodies) == FAST.attempts
    kind, message, data = records[-1]
    assert kind == "notify_failed"
    assert data["attempt"] == 3 and "HTTP 500" in data["error"]
    assert "qwen-lora" in message


async def test_client_errors_are_not_retried(http_receiver: Receiver) -> None:
    http_receiver.statuses = [404]
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert len(http_receiver.bodies) == 1
    assert [kind for kind, _, _ in records] == ["notify_failed"]


async def test_dead_receiver_is_retried_and_recorded() -> None:
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        # Nothing listens on port 9 of loopback: connection refused.
        dispatcher.submit(EVENT, [WebhookSender("http://127.0.0.1:9/hook")])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert [kind for kind, _, _ in records] == ["notify_retry", "notify_retry", "notify_failed"]


async def test_slow_receiver_never_delays_the_loop(http_receiver: Receiver) -> None:
    """The loop releases the receiver that holds the delivery: it ran meanwhile.

    Were `submit` or the delivery to wait for the answer on the loop, nothing on the
    loop could set `release`, and the receiver would answer only after its 10 s.
    """
    http_receiver.hold = True  # answers when released, or after 10 s
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=RetryPolicy(attempts=1, timeout=30.0))
    try:
        dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
        await until(lambda: http_receiver.arrived == 1, timeout=30)  # held by the receiver
        assert dispatcher.pending == 1 and not records  # not delivered, not given up
        http_receiver.release.set()  # from the loop
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert http_receiver.held == [True], "the receiver timed out: the loop was blocked"
    assert [kind for kind, _, _ in records] == ["notify_delivered"]


async def test_hung_attempt_times_out(http_receiver: Receiver) -> None:
    http_receiver.hold = True
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=RetryPolicy(attempts=1, timeout=0.3))
    try:
        dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert records[-1][0] == "notify_failed"
    assert "timed out" in records[-1][2]["error"]


async def test_full_queue_drops_with_a_record(http_receiver: Receiver) -> None:
    http_receiver.hold = True
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST, max_pending=2)
    try:
        sender = WebhookSender(http_receiver.url)
        assert [dispatcher.submit(EVENT, [sender]) for _ in range(3)] == [1, 1, 0]
        assert records[0][0] == "notify_dropped"
        http_receiver.release.set()
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert [kind for kind, _, _ in records].count("notify_delivered") == 2


async def test_close_records_undelivered(http_receiver: Receiver) -> None:
    http_receiver.hold = True
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)])
    await asyncio.sleep(0.05)
    await dispatcher.aclose(drain_timeout=0.1)
    assert dispatcher.submit(EVENT, [WebhookSender(http_receiver.url)]) == 0
    assert [kind for kind, _, _ in records] == ["notify_dropped", "notify_dropped"]


HOOK = """
import json, os, sys
body = json.load(sys.stdin)
body["env"] = {k: os.environ.get(k) for k in ("FTSUP_EVENT", "FTSUP_JOB", "NOTIFY_SOCKET")}
with open(sys.argv[1], "w") as out:
    json.dump(body, out)
sys.exit(int(sys.argv[2]))
"""


async def test_command_hook_receives_the_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    seen = tmp_path / "seen.json"
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        section = NotifySection(command=(sys.executable, "-c", HOOK, str(seen), "0"))
        dispatcher.submit(EVENT, senders_for(section))
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert [kind for kind, _, _ in records] == ["notify_delivered"]
    got = json.loads(seen.read_text())
    assert got["job"] == "qwen-lora" and got["data"] == {"step": 120}
    assert got["env"] == {"FTSUP_EVENT": "failed", "FTSUP_JOB": "qwen-lora", "NOTIFY_SOCKET": None}


async def test_command_hook_failure_is_retried(tmp_path: Path) -> None:
    records, record = recorder()
    dispatcher = NotificationDispatcher(record, policy=FAST)
    try:
        hook = CommandHook([sys.executable, "-c", HOOK, str(tmp_path / "x.json"), "3"])
        dispatcher.submit(EVENT, [hook])
        assert await dispatcher.drain(30)
    finally:
        await dispatcher.aclose()
    assert [kind for kind, _, _ in records] == ["notify_retry", "notify_retry", "notify_failed"]
    assert "exit status 3" in records[-1][2]["error"]


async def test_command_hook_timeout_kills_it(tmp_path: Path) -> None:
    """The hook and what it started are killed at the timeout, not left to run 10 minutes."""
    pids = tmp_path / "pids"
    script = f"sleep 600 & echo $$ $! > {pids}; wait"
    records, record = recorder()
    # 3 s: time for the shell to start and write its pids even on a loaded machine.
    dispatcher = NotificationDispatcher(record, policy=RetryPolicy(attempts=1, timeout=3.0))
    try:
        dispatcher.submit(EVENT, [CommandHook(["sh", "-c", script])])
        assert await dispatcher.drain(60)  # far less than the hook's 600 s
    finally:
        await dispatcher.aclose()
    assert records[-1][0] == "notify_failed" and "timed out" in records[-1][2]["error"]
    shell, child = (int(pid) for pid in pids.read_text().split())
    await until(lambda: not _alive(shell) and not _alive(child), timeout=30)


def _alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped (which for a grandchild would be init's job)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
