"""One bad progress line never ends supervision (issue 12, defect 9).

A real command job writes, in one go, good lines around lines whose numbers no
database or clock can hold (a step of 2**70, 1e999, NaN, an infinite
max_steps), then exits 0. The job must end `finished`, each bad line must be
skipped with one warning, and every good line, before and after, applied.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from tests.supervisor_harness import Harness, wait_for

BAD_LINES = [
    '{"event": "step", "step": 1180591620717411303424, "loss": 1.0}',  # 2**70
    '{"event": "step", "step": 1e999, "loss": 1.0}',
    '{"event": "step", "step": NaN, "loss": 1.0}',
    '{"event": "step", "step": 3, "max_steps": Infinity, "loss": 1.0}',
    '{"event": "checkpoint_saved", "step": -Infinity}',
    '{"event": "step", "step": 3, "ts": 1e999}',
]

WRITER = textwrap.dedent("""\
    import json, os, sys, time
    out, bad = sys.argv[1], json.loads(sys.argv[2])
    os.makedirs(out, exist_ok=True)
    def line(step, loss):
        return json.dumps({"event": "step", "step": step, "max_steps": 10,
                           "loss": loss, "ts": time.time()})
    batch = [line(1, 0.9), *bad, line(2, 0.8)]
    with open(os.environ["FTSUP_PROGRESS_FILE"], "a") as f:
        f.write("\\n".join(batch) + "\\n")
    print("first batch written", flush=True)
    while not os.path.exists(os.path.join(out, "go")):
        time.sleep(0.05)
    with open(os.environ["FTSUP_PROGRESS_FILE"], "a") as f:
        f.write(line(7, 0.25) + "\\n")
""")


def command_job(harness: Harness, name: str, argv: list[str]) -> Path:
    path = harness.work / f"{name}.toml"
    path.write_text(
        textwrap.dedent(f"""\
            [job]
            name = "{name}"
            output_dir = "{harness.work / name}"

            [command]
            argv = {json.dumps(argv)}

            [restart]
            backoff = "0.1s"
            backoff_max = "1s"
            """)
    )
    return path


def test_bad_progress_lines_are_skipped_and_the_rest_applied(daemon: Harness) -> None:
    out = daemon.work / "lines"
    argv = [sys.executable, "-c", WRITER, str(out), json.dumps(BAD_LINES)]
    daemon.cli("start", str(command_job(daemon, "lines", argv)))
    wait_for(lambda: daemon.status("lines")["progress"]["step"] == 2, 60, 0.1, "the first batch")
    first = daemon.status("lines")
    assert first["state"] == "running"
    assert first["progress"]["max_steps"] == 10 and first["progress"]["loss"] == 0.8
    (out / "go").touch()
    status = daemon.wait_state("lines", "finished", "failed", "gave_up")
    assert status["state"] == "finished", status["reason"]
    assert status["progress"]["step"] == 7 and status["progress"]["loss"] == 0.25
    assert status["progress"]["max_steps"] == 10
    events = daemon.cli_json("events", "lines")["events"]
    warnings = [e["message"] for e in events if e["kind"] == "warning"]
    skipped = [m for m in warnings if m.startswith("progress line skipped")]
    assert len(skipped) == len(BAD_LINES), warnings
    assert any("out of range" in m for m in skipped)
    assert any("not a finite number" in m for m in skipped)
