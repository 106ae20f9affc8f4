"""Another user's process on a GPU makes it busy (issue 15): the daemon's placement,
with a real store and event bus, fed the GPUs and their foreign memory as the daemon
feeds them (`views_from_monitor`, `foreign_memory`: NVML, which this machine lacks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.placement import Placement
from ftsup.supervisor.scheduling import GpuView
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import Store

GIB_IN_MIB = 1024


def count_job(tmp_path: Path, name: str, count: int) -> JobSpec:
    text = (
        f'[job]\nname = "{name}"\noutput_dir = "out-{name}"\n'
        f'[command]\nargv = ["true"]\n[gpu]\ncount = {count}\n'
    )
    return parse_spec(text, tmp_path / f"{name}.toml")


async def test_a_gpu_held_by_another_process_is_busy_until_it_lets_go(tmp_path: Path) -> None:
    store = Store(tmp_path / "ftsup.db")
    try:
        placement = Placement(store, EventBus(store))
        placement.gpu_views = lambda: [GpuView(index=0, healthy=True), GpuView(1, True)]
        foreign = {0: 3 * GIB_IN_MIB, 1: 0}
        placement.foreign_memory = lambda: dict(foreign)
        shown: list[tuple[str, str]] = []
        never = asyncio.Event()

        def show(state: str, why: str) -> None:
            shown.append((state, why))

        first = await placement.acquire(
            count_job(tmp_path, "a", 1), show, lambda: False, asyncio.Event()
        )
        assert first == (1,)  # GPU 0 holds another user's 3 GiB
        second = asyncio.create_task(
            placement.acquire(count_job(tmp_path, "b", 1), show, lambda: False, never)
        )
        while not shown:
            await asyncio.sleep(0.01)
        state, why = shown[-1]
        assert state == "queued" and "another process" in why and "used by a" in why
        foreign[0] = 0  # the other user's process ended: the next periodic look sees it
        assert await asyncio.wait_for(second, 30) == (0,)
    finally:
        store.close()
