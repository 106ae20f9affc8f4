"""A trainer that converted a sharded checkpoint to resume on another world size
says so on its progress stream (`elastic_convert`); the daemon's follower turns it
into a `resized` event in the job's history, once, for the current attempt only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import PROGRESS_ELASTIC_CONVERT
from ftsup.supervisor.daemon.follower import RunFollower
from ftsup.supervisor.protocol import EventKind
from ftsup.supervisor.spec import parse_spec


def test_a_conversion_of_the_current_attempt_becomes_a_resized_event(tmp_path: Path) -> None:
    spec = parse_spec(
        f'[job]\nname = "j"\noutput_dir = "{tmp_path / "out"}"\n'
        '[train]\nmodel = "m"\ndataset = "d.jsonl"\n[launch]\ndeepspeed = "zero3"\n',
        tmp_path / "j.toml",
    )
    emitted: list[tuple[str, str, dict[str, Any]]] = []
    progress = tmp_path / "progress.jsonl"
    follower = RunFollower(spec, progress, lambda *event: emitted.append(event))
    attempt_dir = tmp_path / "attempt-2"
    attempt_dir.mkdir()
    follower.begin_attempt(attempt_dir, started_at=100.0, start_step=2, log_file="stdout.log")
    converted = {
        "event": PROGRESS_ELASTIC_CONVERT,
        "checkpoint": str(tmp_path / "out" / "checkpoint-2"),
        "step": 2,
        "from_world_size": 2,
        "to_world_size": 1,
        "zero_stage": 3,
        "seconds": 0.4,
    }
    with progress.open("a") as lines:
        lines.write(json.dumps({**converted, "ts": 50.0}) + "\n")  # an earlier attempt's
        lines.write(json.dumps({**converted, "ts": 101.0}) + "\n")
    follower.read()
    follower.read()  # nothing new: no second event
    resized = [e for e in emitted if e[0] == EventKind.RESIZED]
    assert len(resized) == 1
    _, message, data = resized[0]
    assert message == (
        "converted checkpoint-2 (ZeRO-3) from 2 to 1 processes in 0.4 s (universal checkpoint)"
    )
    assert (data["from_world_size"], data["to_world_size"], data["step"]) == (2, 1, 2)
