"""A `Source` that replays answers and events a real daemon once gave.

`tests/tui/record_state.py` records them from a daemon running real toy jobs;
the snapshot tests and the README capture replay them with the clock frozen at
the moment of recording, so every age, ETA and curve on screen is the same on
every run. It is not a mock of the daemon: it cannot answer anything that was
not recorded, and says so.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from ftsup.supervisor.protocol import RequestError
from ftsup.tui.messages import Connected, DaemonEvent
from ftsup.tui.source import Post

RECORDING_FORMAT = "ftsup-tui-recording/1"
# Arguments that select *what* is asked; the others (limits, sizes) only shape it.
_SELECTING_ARGS = ("job", "attempt")


def request_key(kind: str, args: dict[str, Any]) -> str:
    selecting = {k: args[k] for k in _SELECTING_ARGS if args.get(k) is not None}
    return json.dumps([kind, selecting], sort_keys=True)


class RecordedSource:
    def __init__(self, recording: dict[str, Any]) -> None:
        if recording.get("format") != RECORDING_FORMAT:
            raise ValueError(f"not a {RECORDING_FORMAT} recording")
        self.recording = recording
        self.target = str(recording.get("target", "recording"))
        self._answers: dict[str, dict[str, Any]] = {}
        for answer in recording.get("answers", []):
            request = dict(answer["request"])
            kind = str(request.pop("type"))
            self._answers[request_key(kind, request)] = answer
        self.requests: list[tuple[str, dict[str, Any]]] = []  # what the app asked, in order

    @classmethod
    def load(cls, path: Path) -> RecordedSource:
        return cls(json.loads(path.read_text()))

    def now(self) -> float:
        return float(self.recording["recorded_at"])

    async def run(self, post: Post) -> None:
        for event in self.recording.get("events", []):
            post(DaemonEvent(event))
        post(Connected({**self.recording.get("daemon", {}), "replay": True}))
        await asyncio.Event().wait()  # a daemon that stays up and quiet

    async def request(self, kind: str, **args: Any) -> dict[str, Any]:
        self.requests.append((kind, args))
        answer = self._answers.get(request_key(kind, args))
        if answer is None:
            raise RequestError("not_recorded", f"the recording holds no answer to {kind} {args}")
        if "error" in answer:
            error = answer["error"]
            raise RequestError(error.get("code", "error"), error.get("message", ""))
        result = answer["result"]
        assert isinstance(result, dict)
        copy: dict[str, Any] = json.loads(json.dumps(result))  # fresh, as a socket gives
        return copy

    async def close(self) -> None:
        return None
