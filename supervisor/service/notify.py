"""Notifications (`[notify]`): webhooks and command hooks, delivered in the background.

Supervision must never wait for Slack. `NotificationDispatcher.submit()` only
schedules; each delivery runs as its own task whose blocking I/O (urllib, a
subprocess) happens on a small private thread pool, so a slow or dead receiver
neither blocks the event loop nor starves the daemon's default executor.
Every delivery, retry, failure and drop is handed to a `record` callback that
the daemon writes into its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from ftsup.supervisor import __version__
from ftsup.supervisor.contract import ENV_EVENT, ENV_JOB
from ftsup.supervisor.protocol import EventKind
from ftsup.supervisor.service.sdnotify import clean_child_env
from ftsup.supervisor.spec_types import NotifySection

log = logging.getLogger(__name__)

DISCORD_CONTENT_LIMIT = 2000

RecordFn = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class Notification:
    event: str
    job: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return f"ftsup: {self.job} {self.event}: {self.message}"

    def body(self) -> dict[str, Any]:
        """One JSON body for everyone: Slack reads `text`, Discord `content`, others the rest."""
        summary = self.summary
        if len(summary) > DISCORD_CONTENT_LIMIT:
            summary_short = summary[: DISCORD_CONTENT_LIMIT - 1] + "…"
        else:
            summary_short = summary
        return {
            "text": summary,
            "content": summary_short,
            "event": self.event,
            "job": self.job,
            "message": self.message,
            "data": dict(self.data),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.body(), default=str).encode()


class DeliveryError(Exception):
    """A failed attempt; `retryable` is False for answers that retrying cannot change."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.retry_after = retry_after


class Sender(Protocol):
    """Delivers one notification, blocking (it runs on a worker thread)."""

    @property
    def name(self) -> str: ...

    def send(self, notification: Notification, timeout: float) -> None: ...


class WebhookSender:
    """POSTs the JSON body; 2xx is success, 5xx/408/429 and network errors are retried."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"a webhook must be an http(s) URL, got {url!r}")
        self.url = url
        self.headers = dict(headers or {})
        # Webhook URLs carry their secret in the path: records name the host only.
        self._name = f"webhook {parsed.scheme}://{parsed.netloc.rpartition('@')[2]}"

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification, timeout: float) -> None:
        request = urllib.request.Request(
            self.url,
            data=notification.to_json(),
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"ftsup/{__version__}",
                **self.headers,
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:
            retryable = exc.code >= 500 or exc.code in (408, 429)
            retry_after = _retry_after(exc.headers.get("Retry-After"))
            raise DeliveryError(
                f"HTTP {exc.code} {exc.reason}", retryable=retryable, retry_after=retry_after
            ) from None
        except urllib.error.URLError as exc:
            raise DeliveryError(str(exc.reason), retryable=True) from None
        except (OSError, ValueError) as exc:  # timeouts, resets, bad status lines
            raise DeliveryError(str(exc) or type(exc).__name__, retryable=True) from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


class CommandHook:
    """Runs a user command with the JSON body on stdin and `FTSUP_EVENT`/`FTSUP_JOB` set.

    Its own session, so a timeout kills whatever it started too; exit status 0 is success.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if not argv:
            raise ValueError("a command hook needs a command")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None

    @property
    def name(self) -> str:
        return f"command {os.path.basename(self.argv[0])}"

    def send(self, notification: Notification, timeout: float) -> None:
        env = clean_child_env(os.environ if self.env is None else self.env)
        env.update({ENV_EVENT: notification.event, ENV_JOB: notification.job})
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot run {self.argv[0]}: {exc}", retryable=False) from None
        try:
            _, stderr = proc.communicate(notification.to_json(), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeliveryError(f"timed out after {timeout:g}s", retryable=True) from None
        if proc.returncode != 0:
            tail = stderr.decode(errors="replace").strip()[-300:]
            raise DeliveryError(f"exit status {proc.returncode}: {tail}", retryable=True)


def wanted(section: NotifySection, event: str) -> bool:
    """`event` is the bus's kind; `[notify] on` holds the same names (one list:
    protocol.NOTIFY_EVENTS, old aliases already resolved by spec.py)."""
    return event in section.on


def senders_for(section: NotifySection) -> list[Sender]:
    """The senders a `[notify]` table asks for (none when it names neither)."""
    senders: list[Sender] = []
    if section.webhook:
        senders.append(WebhookSender(section.webhook))
    if section.command:
        senders.append(CommandHook(section.command))
    return senders


@dataclass(frozen=True)
class RetryPolicy:
    """Per delivery: `attempts` tries, each bounded by `timeout`, backoff doubling in between."""

    attempts: int = 5
    initial_delay: float = 2.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    timeout: float = 10.0

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        delay = self.initial_delay * self.multiplier ** (failed_attempts - 1)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_delay)


class NotificationDispatcher:
    """Delivers notifications in the background with retries; `submit()` never waits.

    Bounded: at most `max_pending` deliveries are waiting or in flight; beyond
    that a delivery is dropped and recorded. Each delivery is its own task, so
    a dead receiver in backoff does not hold up deliveries to the others.
    Create and use it on the daemon's event loop.
    """

    def __init__(
        self,
        record: RecordFn,
        *,
        policy: RetryPolicy | None = None,
        max_pending: int = 100,
        workers: int = 4,
    ) -> None:
        self._record_fn = record
        self.policy = policy or RetryPolicy()
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftsup-notify")
        self._slots = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def submit(self, notification: Notification, senders: Sequence[Sender]) -> int:
        """Schedule one delivery per sender; returns how many were accepted (not dropped)."""
        accepted = 0
        for sender in senders:
            if self._closed or len(self._tasks) >= self.max_pending:
                why = "dispatcher closed" if self._closed else f"{self.max_pending} pending"
                self._record(
                    EventKind.NOTIFY_DROPPED,
                    f"{notification.event} for {notification.job} not sent to {sender.name}: {why}",
                    notification,
                    sender,
                )
                continue
            task = asyncio.get_running_loop().create_task(self._deliver(notification, sender))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            accepted += 1
        return accepted

    async def _deliver(self, notification: Notification, sender: Sender) -> None:
        try:
            await self._deliver_with_retries(notification, sender)
        except asyncio.CancelledError:
            self._record(
                EventKind.NOTIFY_DROPPED,
                f"{notification.event} for {notification.job} not sent to {sender.name}: "
                "the daemon is stopping",
                notification,
                sender,
            )
            raise

    async def _deliver_with_retries(self, notification: Notification, sender: Sender) -> None:
        policy = self.policy
        what = f"{notification.event} for {notification.job}"
        for attempt in range(1, policy.attempts + 1):
            try:
                async with self._slots:
                    await self._attempt(notification, sender)
            except DeliveryError as exc:
                error = exc
            else:
                self._record(
                    EventKind.NOTIFY_DELIVERED,
                    f"{what} sent to {sender.name}",
                    notification,
                    sender,
                    attempt=attempt,
                )
                return
            if not error.retryable or attempt == policy.attempts:
                break
            delay = policy.delay(attempt, error.retry_after)
            self._record(
                EventKind.NOTIFY_RETRY,
                f"{what} to {sender.name} failed ({error}); retrying in {delay:g}s",
                notification,
                sender,
                attempt=attempt,
                error=str(error),
            )
            await asyncio.sleep(delay)
        self._record(
            EventKind.NOTIFY_FAILED,
            f"{what} dropped: {sender.name} failed {attempt} time(s), last: {error}",
            notification,
            sender,
            attempt=attempt,
            error=str(error),
        )

    async def _attempt(self, notification: Notification, sender: Sender) -> None:
        timeout = self.policy.timeout
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, sender.send, notification, timeout)
        try:
            # The sender enforces its own timeout; this bounds a sender that does not.
            await asyncio.wait_for(future, timeout + 1.0)
        except TimeoutError:
            raise DeliveryError(f"timed out after {timeout:g}s", retryable=True) from None
        except DeliveryError:
            raise
        except Exception as exc:  # a bug in a sender is a failed attempt, not a dead task
            raise DeliveryError(repr(exc), retryable=True) from None

    def _record(
        self,
        kind: str,
        message: str,
        notification: Notification,
        sender: Sender,
        **extra: Any,
    ) -> None:
        data = {"event": notification.event, "job": notification.job, "sender": sender.name}
        data.update(extra)
        try:
            self._record_fn(kind, message, data)
        except Exception:
            log.exception("recording %s failed", kind)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for pending deliveries; True when none are left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    async def aclose(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, give pending deliveries `drain_timeout`, cancel the rest."""
        self._closed = True
        await self.drain(drain_timeout)
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Threads still inside urllib end at their own socket timeout.
        self._executor.shutdown(wait=False, cancel_futures=True)
