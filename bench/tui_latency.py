"""TUI benchmark: progress-to-screen latency, and CPU/memory while left open.

    python bench/tui_latency.py [--samples 20] [--idle-seconds 30]

1. Latency. A real daemon runs the toy trainer (one step every 0.5 s). The
   trainer stamps each progress line with the wall time it wrote it (`ts`). The
   app runs headless in this process; the time its jobs table gets a new step
   and the time of the next frame it draws are recorded. Latency = frame time -
   `ts` of that step's line. It includes the daemon's follow interval (0.2 s).
2. Idle cost. Four toy jobs run (10 steps/s each, so the daemon streams ~5
   progress and ~5 log events/s per job: a stress case). The TUI runs as its
   own headless process on the dashboard (and, second run, on a job's streaming
   log tab); its CPU time and RSS are read from /proc over `--idle-seconds`.
   Then four jobs at one step a second (closer to real fine-tuning), and, first
   of all, no job at all (nothing streams).

Prints a Markdown table (paste into docs/tui.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ftsup.tui.app import FtsupApp  # noqa: E402
from ftsup.tui.connection import DaemonConnection  # noqa: E402
from ftsup.tui.screens.job import JobScreen  # noqa: E402
from ftsup.tui.widgets.job_row import JobRow  # noqa: E402
from tests.supervisor_harness import Harness, wait_for  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# latency -------------------------------------------------------------------------
async def measure_latency(harness: Harness, samples: int) -> list[float]:
    spec = harness.toy_job(
        "lat", "--max-steps", "100000", "--step-time", "0.5", "--save-steps", "1000"
    )
    harness.cli("start", str(spec))
    progress_file = harness.state_dir / "runs" / "lat" / "progress.jsonl"
    app = FtsupApp(DaemonConnection(harness.runtime_dir / "ftsup.sock"))
    shown_at: dict[int, float] = {}  # step -> when the table cell got it
    frames: list[float] = []
    async with app.run_test(size=(120, 30)) as pilot:
        original_display = app._display

        def display(screen: Any, renderable: Any) -> None:
            frames.append(time.time())
            original_display(screen, renderable)

        app._display = display  # type: ignore[method-assign]
        original_show = JobRow.show

        def show(row: JobRow, cells: dict[str, Any]) -> None:
            if row.job_name == "lat":
                text = cells["progress"].plain.split()[-1]
                if text[0].isdigit():
                    shown_at.setdefault(int(text.split("/")[0]), time.time())
            original_show(row, cells)

        JobRow.show = show  # type: ignore[assignment,method-assign]
        deadline = time.monotonic() + samples * 0.5 + 30
        while len(shown_at) < samples + 2 and time.monotonic() < deadline:
            await pilot.pause(0.1)
    written: dict[int, float] = {}
    for line in progress_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step":
            written[int(record["step"])] = float(record["ts"])
    latencies = []
    for step, at in sorted(shown_at.items())[1:]:  # the first one predates the app
        if step not in written:
            continue
        frame = next((f for f in frames if f >= at), None)
        if frame is not None:
            latencies.append(frame - written[step])
    return latencies[:samples]


# idle cost ----------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_child(sock: str, open_job: str | None) -> None:
    """The TUI as its own process (headless), optionally on a job's log tab."""
    app = FtsupApp(DaemonConnection(Path(sock)))

    async def open_log() -> None:
        await asyncio.wait_for(app.synced.wait(), 30)
        app.push_screen(
            JobScreen(app.state, app.source.now, open_job or "", app.reload_job, tab="log")
        )
        app.reload_job(open_job or "", ("detail", "events", "logs", "checkpoints"))

    if open_job:
        app.call_later(lambda: app.run_worker(open_log()))
    app.run(headless=True, size=(120, 40))


def measure_idle(harness: Harness, seconds: float, open_job: str | None) -> dict[str, float]:
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            str(harness.runtime_dir / "ftsup.sock"),
            *(["--open", open_job] if open_job else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # start-up and the first load are not "idle"
        assert child.poll() is None, "the TUI child exited"
        cpu0, t0 = cpu_seconds(child.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(child.pid), time.monotonic()
        return {"cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0), "rss_mib": rss_mib(child.pid)}
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--open", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.open)
        return 0

    rows: list[tuple[str, str]] = []
    harness = Harness()
    try:
        harness.start_daemon()
        idle_nothing = measure_idle(harness, args.idle_seconds, None)
        latencies = asyncio.run(measure_latency(harness, args.samples))
        harness.cli("stop", "lat", "--now")
        for k in range(4):
            spec = harness.toy_job(
                f"job{k}", "--max-steps", "100000", "--step-time", "0.1", "--save-steps", "200"
            )
            harness.cli("start", str(spec))
        wait_for(
            lambda: all(harness.status(f"job{k}")["progress"]["step"] > 5 for k in range(4)),
            60,
            0.5,
            "4 running jobs",
        )
        idle_dash = measure_idle(harness, args.idle_seconds, None)
        idle_log = measure_idle(harness, args.idle_seconds, "job0")
        for k in range(4):
            harness.cli("stop", f"job{k}", "--now")
        for k in range(4):  # one step a second: closer to a real fine-tuning run
            spec = harness.toy_job(
                f"slow{k}", "--max-steps", "100000", "--step-time", "1.0", "--save-steps", "200"
            )
            harness.cli("start", str(spec))
        wait_for(
            lambda: all(harness.status(f"slow{k}")["progress"]["step"] > 1 for k in range(4)),
            60,
            0.5,
            "4 slow jobs",
        )
        idle_slow = measure_idle(harness, args.idle_seconds, None)
    finally:
        harness.cleanup()
    ms = sorted(1000 * x for x in latencies)
    rows.append(
        ("progress line → step on screen, median", f"{statistics.median(ms):.0f} ms (n={len(ms)})")
    )
    rows.append(("… p95 / max", f"{ms[int(0.95 * (len(ms) - 1))]:.0f} ms / {ms[-1]:.0f} ms"))
    rows.append(
        (
            "TUI CPU, dashboard, 4 jobs at 10 steps/s each",
            f"{idle_dash['cpu_percent']:.1f} % of a core, RSS {idle_dash['rss_mib']:.0f} MiB",
        )
    )
    rows.append(
        (
            "TUI CPU, a streaming log tab, same 4 jobs",
            f"{idle_log['cpu_percent']:.1f} % of a core, RSS {idle_log['rss_mib']:.0f} MiB",
        )
    )
    rows.append(
        (
            "TUI CPU, dashboard, 4 jobs at 1 step/s each",
            f"{idle_slow['cpu_percent']:.1f} % of a core, RSS {idle_slow['rss_mib']:.0f} MiB",
        )
    )
    rows.append(
        (
            "TUI CPU, no jobs (nothing streams)",
            f"{idle_nothing['cpu_percent']:.1f} % of a core, RSS {idle_nothing['rss_mib']:.0f} MiB",
        )
    )
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
