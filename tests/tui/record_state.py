"""Record what a real daemon answers and pushes while real toy jobs run.

    python -m tests.tui.record_state [OUT.json]

Four jobs on the toy trainer: one crashes once and keeps running
(`qwen-lora`), one finishes (`llama-sft`), one crash-loops until the daemon
gives up (`mistral-dpo`), one is stopped on request (`phi-full`). The daemon
runs in this process with the NVML double of tests/health/nvml_double.py (two
"H100"s whose load varies; GPU 1 falls off the bus once its jobs are done), so
the GPU strip and a GPU fault are on record on a machine without GPUs. Every event
pushed on a subscription is kept in order, then every request the TUI makes is
asked once and its answer (or error) kept. `RecordedSource` replays the file
with the clock frozen at `recorded_at`: that is what makes the snapshot tests
deterministic. Re-record only on purpose: the snapshots change with it
(`pytest tests/tui --snapshot-update`), and so do the docs' captures
(`python -m tests.tui.update_docs --update`).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.client import AsyncClient, Client
from ftsup.supervisor.daemon.app import Daemon
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import RequestError
from ftsup.tui.recorded import RECORDING_FORMAT
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB
from tests.supervisor_harness import Harness, wait_for

DEFAULT_OUT = Path(__file__).parent / "data" / "recording.json"


async def _ask(client: AsyncClient, kind: str, **args: Any) -> dict[str, Any]:
    request = {"type": kind, **args}
    try:
        return {"request": request, "result": await client.request(kind, **args)}
    except RequestError as exc:
        return {"request": request, "error": {"code": exc.code, "message": exc.message}}


def on_gpu(index: int) -> str:
    return f"\n[gpu]\ndevices = [{index}]\n"


async def vary_load(fake: FakeNvml) -> None:
    """Make the fake GPUs' figures move like a training loop's would."""
    t = 0
    while True:
        for index, gpu in enumerate(fake.gpus):
            wave = math.sin(t / 3 + index)
            gpu.util_gpu = max(0, min(100, int(80 + 18 * wave) - 60 * index * (t > 8)))
            gpu.memory_used = int((58 + 6 * wave - 40 * index * (t > 8)) * GiB)
            gpu.temp_c = int(66 + 6 * wave)
            gpu.power_mw = int(560_000 + 110_000 * wave)
        t += 1
        await asyncio.sleep(0.5)


async def record(harness: Harness, fake: FakeNvml) -> dict[str, Any]:
    sock = harness.runtime_dir / "ftsup.sock"
    events_client = AsyncClient(sock, name="recorder-events")
    await events_client.connect()
    await events_client.subscribe()
    requests = AsyncClient(sock, name="recorder")
    await requests.connect()
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        while (event := await events_client.next_event()) is not None:
            events.append(event)

    collector = asyncio.create_task(collect())
    load = asyncio.create_task(vary_load(fake))
    jobs = {
        "qwen-lora": harness.toy_job(
            "qwen-lora",
            "--max-steps",
            "3000",
            "--step-time",
            "0.08",
            "--save-steps",
            "25",
            "--crash-at",
            "40",
            extra=on_gpu(0),
        ),
        "llama-sft": harness.toy_job(
            "llama-sft",
            "--max-steps",
            "60",
            "--step-time",
            "0.03",
            "--save-steps",
            "20",
            extra=on_gpu(0),
        ),
        "mistral-dpo": harness.toy_job(
            "mistral-dpo",
            "--max-steps",
            "100",
            "--step-time",
            "0.03",
            "--save-steps",
            "5",
            "--crash-always-at",
            "12",
            restart="crash_loop = 2",
            extra=on_gpu(1),
        ),
        "phi-full": harness.toy_job(
            "phi-full",
            "--max-steps",
            "1000",
            "--step-time",
            "0.05",
            "--save-steps",
            "10",
            extra=on_gpu(1),
        ),
    }
    for spec in jobs.values():
        await requests.request("start", spec_path=str(spec), spec_text=spec.read_text())
    await asyncio.sleep(2.0)
    await requests.request("stop", job="phi-full", now=False)
    for _ in range(100):  # GPU 1 is idle once its jobs are done: then it falls off the bus
        states = [
            (await requests.request("status", job=j))["state"] for j in ("mistral-dpo", "phi-full")
        ]
        if all(state in ("stopped", "gave_up") for state in states):
            break
        await asyncio.sleep(0.1)
    fake.push_xid(1, 79)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await requests.request("status", job="qwen-lora")
        if (status.get("progress") or {}).get("step", 0) >= 130:
            break
        await asyncio.sleep(0.2)
    collector.cancel()
    load.cancel()
    await events_client.close()
    answers = [
        await _ask(requests, "status"),
        await _ask(requests, "events", limit=300, after_id=0),
        await _ask(requests, "gpus"),
    ]
    for name in jobs:
        answers += [
            await _ask(requests, "status", job=name),
            await _ask(requests, "events", job=name, limit=200),
            await _ask(requests, "logs", job=name, lines=1000),
            await _ask(requests, "checkpoints", job=name),
            await _ask(requests, "progress_history", job=name, limit=2000),
        ]
    await requests.close()
    return {
        "format": RECORDING_FORMAT,
        "note": "answers and events of a real ftsup daemon (NVML: tests/health/nvml_double.py) "
        "running tests/scripts/toy_trainer.py; recorded by tests/tui/record_state.py",
        "recorded_at": time.time(),
        "target": str(sock),
        "daemon": requests.daemon,
        "events": events,
        "answers": answers,
    }


def write(recording: dict[str, Any], out: Path) -> None:
    """One event or answer per line: diffs of a re-recording stay readable."""
    head = {k: v for k, v in recording.items() if k not in ("events", "answers")}
    lines = ["{" + json.dumps(head)[1:-1] + ","]
    for key in ("events", "answers"):
        items = recording[key]
        lines.append(f'"{key}": [')
        lines += [
            json.dumps(item) + ("," if k < len(items) - 1 else "") for k, item in enumerate(items)
        ]
        lines.append("]," if key == "events" else "]")
    lines.append("}")
    out.write_text("\n".join(lines) + "\n")
    json.loads(out.read_text())  # it parses


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    harness = Harness()
    fake = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-second")])
    daemon = Daemon(Layout.from_env(harness.state_dir, harness.runtime_dir), nvml=fake.module)
    thread = threading.Thread(target=lambda: asyncio.run(daemon.run()), daemon=True)
    try:
        thread.start()
        wait_for(lambda: harness.cli("ls", check=False).returncode == 0, 20, what="the daemon")
        recording = asyncio.run(record(harness, fake))
    finally:
        try:
            with Client(harness.runtime_dir / "ftsup.sock") as client:
                client.request("shutdown")
            thread.join(20)
        finally:
            harness.cleanup()
    write(recording, out)
    print(f"{out}: {len(recording['events'])} events, {len(recording['answers'])} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
