"""Messages from the connection worker to the app (the only way data reaches the UI)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class Connected(Message):
    """Both connections are up and subscribed; the app should (re)load everything."""

    def __init__(self, daemon: dict[str, Any]) -> None:
        super().__init__()
        self.daemon = daemon


class Disconnected(Message):
    """The daemon went away (or never answered); the worker retries after `retry_in`."""

    def __init__(self, reason: str, attempt: int, retry_in: float) -> None:
        super().__init__()
        self.reason = reason
        self.attempt = attempt
        self.retry_in = retry_in


class DaemonEvent(Message):
    """One event pushed by the daemon on the subscription."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__()
        self.event = event
