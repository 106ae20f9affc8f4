"""Stop and checkpoint requests from signals: handlers only set flags.

A signal can arrive in the middle of a backward pass or a file write; acting
there would corrupt state. So the handlers record the request and the
training callback acts on it at the next optimizer-step boundary.

SIGTERM, SIGUSR1: save a checkpoint, then exit 75.
SIGUSR2:          save a checkpoint, keep training.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SAVE_SIGNALS = (signal.SIGUSR2,)


@dataclass
class Requests:
    """What the signals asked for since the flags were last consumed."""

    stop: bool = False
    save: bool = False
    last_signal: str | None = None


REQUESTS = Requests()
_installed = False


def _on_stop(signum: int, _frame: FrameType | None) -> None:
    REQUESTS.stop = True
    REQUESTS.last_signal = signal.Signals(signum).name


def _on_save(signum: int, _frame: FrameType | None) -> None:
    REQUESTS.save = True
    REQUESTS.last_signal = signal.Signals(signum).name


def install_handlers() -> bool:
    """Install the flag-setting handlers once; False where that is impossible
    (not the main thread), in which case signals keep their default action."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop)
    for sig in SAVE_SIGNALS:
        signal.signal(sig, _on_save)
    _installed = True
    return True
