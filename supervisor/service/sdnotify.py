"""sd_notify without python-systemd: READY, STATUS, WATCHDOG and STOPPING datagrams.

systemd names a datagram socket in `NOTIFY_SOCKET` (a path, or `@name` for the
abstract namespace). With `Type=notify` the unit is "started" only once we send
`READY=1`, and with `WatchdogSec=` systemd kills and restarts us if `WATCHDOG=1`
stops arriving. The pings are sent by a coroutine on the daemon's event loop
(`watchdog_loop`), so a blocked loop stops them by construction.

Sending never raises and waits at most `SEND_TIMEOUT`: the daemon must not
die or stall because systemd is busy. Outside systemd everything is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT = 0.1  # seconds the event loop may wait for a busy systemd

# Variables systemd hands to the service itself. A trainer that inherited them
# could send READY/WATCHDOG in our name or think it was socket-activated.
_CHILD_ENV_DROP = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"}
)
_CHILD_ENV_DROP_PREFIXES = ("LISTEN_",)


def clean_child_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without systemd's per-service variables, for trainer processes.

    `JOURNAL_STREAM` goes too: a trainer's stderr is its log file, not the journal.
    """
    return {
        key: value
        for key, value in env.items()
        if key not in _CHILD_ENV_DROP and not key.startswith(_CHILD_ENV_DROP_PREFIXES)
    }


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of `WATCHDOG_USEC`), or None when no watchdog is ours.

    `WATCHDOG_PID`, when set, names the process the watchdog is meant for; a
    value that is not our pid means it was inherited and is not ours to feed.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def _address(name: str) -> str | None:
    """The `sendto` address for a `NOTIFY_SOCKET` value; `@name` is abstract."""
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # vsock and other forms: not supported, treated as absent


class Notifier:
    """Sends sd_notify messages to one socket; a no-op when there is none."""

    def __init__(self, socket_name: str | None) -> None:
        self._address = _address(socket_name) if socket_name else None
        self._sock: socket.socket | None = None
        if socket_name and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket; not notifying", socket_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when not sent."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # systemd drains its queue at once; if it cannot, wait briefly, then drop.
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", payload[:60], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is done (socket bound, runs re-adopted)."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status_line(status))

    def status(self, text: str) -> bool:
        """One-line summary that `systemctl status` shows."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", _status_line(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time, e.g. while re-adopting many runs."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())


class Heartbeat:
    """Marks that the supervision loop made a full pass; a liveness check reads its age."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._last

    def fresh_within(self, seconds: float) -> Callable[[], bool]:
        """A liveness check for `watchdog_loop`: the last beat is at most `seconds` old."""
        return lambda: self.age() <= seconds


async def watchdog_loop(notifier: Notifier, interval: float, liveness: Callable[[], bool]) -> None:
    """Ping `WATCHDOG=1` every `interval` seconds while `liveness()` holds; runs until cancelled.

    A failed or raising liveness check skips the ping, so systemd restarts a
    daemon whose loop runs but whose supervision is stuck.
    """
    failing = False
    while True:
        try:
            alive = bool(liveness())
        except Exception:
            log.exception("watchdog liveness check raised")
            alive = False
        if alive:
            notifier.watchdog()
            if failing:
                log.warning("watchdog liveness check passes again")
            failing = False
        elif not failing:
            log.error("watchdog liveness check fails; withholding WATCHDOG=1")
            failing = True
        await asyncio.sleep(interval)
