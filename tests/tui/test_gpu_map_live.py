"""The GPU map and queue (`m`) under Pilot, against a real daemon on simulated GPUs
(FTSUP_SIMULATE_GPUS) running toy trainers: holders, a fault, a waiting job's
reason, and the map following the queue when the holder ends."""

from __future__ import annotations

import asyncio

from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from ftsup.tui.capture import screen_text
from ftsup.tui.screens.dashboard import DashboardScreen
from ftsup.tui.screens.gpu_map import GpuMapScreen
from ftsup.tui.widgets.gpu_map import GpuMap
from ftsup.tui.widgets.jobs_table import JobsTable
from tests.supervisor_harness import Harness
from tests.test_gpu_queue import queued_job
from tests.tui.test_live import live_app, wait_until

SLOW = ("--max-steps", "100000", "--step-time", "0.2")  # runs until stopped, cheaply


async def test_the_map_names_each_holder_and_the_queue_says_why_a_job_waits(
    harness: Harness,
) -> None:
    harness.env[ENV_SIMULATE_GPUS] = "4"
    await asyncio.to_thread(harness.start_daemon)
    cli = harness.cli
    await asyncio.to_thread(
        cli, "start", str(queued_job(harness, "holder", *SLOW, gpu="count = 2"))
    )
    await asyncio.to_thread(harness.wait_state, "holder", "running")
    held = (await asyncio.to_thread(harness.cli_json, "queue"))["holding"][0]["gpus"]
    spare = next(i for i in range(4) if i not in held)
    # A fault on a GPU nobody holds: the map shows it, and the waiter cannot use it.
    await asyncio.to_thread(cli, "gpus", "simulate-xid", str(spare), "79")
    waiter = queued_job(harness, "waiter", *SLOW, gpu="count = 3", job_keys="priority = 5")
    await asyncio.to_thread(cli, "start", str(waiter))
    reason = (await asyncio.to_thread(harness.wait_state, "waiter", "queued"))["reason"]
    assert "holder" in reason and "unhealthy" in reason  # the daemon's sentence

    app = live_app(harness)
    async with app.run_test(size=(160, 40)) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        assert isinstance(app.screen, DashboardScreen)
        table = app.screen.query_one(JobsTable)
        assert table.cell_text("waiter", "state") == "queued"
        assert "1 waiting" in screen_text(app)

        await pilot.press("m")
        assert isinstance(app.screen, GpuMapScreen)
        gpu_map = app.screen.query_one(GpuMap)
        await wait_until(pilot, lambda: len(gpu_map.rows) == 4, "four GPUs on the map")
        rows = {row.index: row for row in gpu_map.rows}
        for index in range(4):
            expected = "holder" if index in held else "free" if index != spare else "–"
            assert rows[index].state == expected, rows[index]
        assert rows[spare].healthy is False and "XID 79" in rows[spare].health
        assert rows[held[0]].mem_total == 80 * 2**30  # FTSUP_SIMULATE_GPUS=4: 80 GiB each
        text = screen_text(app)
        assert reason in text  # the waiting job's reason, in full
        waiting_line = next(line for line in text.splitlines() if " waiter " in line)
        assert waiting_line.split()[:5] == ["1", "waiter", "queued", "5", "3"]

        # The holder ends: the map follows the queue without a key press.
        await asyncio.to_thread(cli, "stop", "holder")
        await asyncio.to_thread(harness.wait_state, "waiter", "running")
        now_held = (await asyncio.to_thread(harness.cli_json, "queue"))["holding"]
        assert [h["job"] for h in now_held] == ["waiter"]
        await wait_until(
            pilot,
            lambda: (
                sorted(r.index for r in gpu_map.rows if r.holder == "waiter") == now_held[0]["gpus"]
            ),
            "the waiter shown holding its GPUs",
        )
        await wait_until(pilot, lambda: "no job waits for a GPU" in screen_text(app), "no queue")
        await pilot.press("m")  # m again: back to the dashboard
        assert isinstance(app.screen, DashboardScreen)
    await asyncio.to_thread(cli, "stop", "waiter")
    await asyncio.to_thread(harness.wait_state, "waiter", "stopped")
