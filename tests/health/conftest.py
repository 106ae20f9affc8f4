"""Fixtures for the health tests around the NVML double (the only test double here)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from ftsup.supervisor.health.gpu import GpuEvent, GpuMonitor
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB


class Events:
    """The monitor's on_event callback, with a way to wait for the next event."""

    def __init__(self) -> None:
        self.queue: queue.Queue[GpuEvent] = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, event: GpuEvent) -> None:
        self.threads.add(threading.current_thread().name)
        self.queue.put(event)

    def next(self, timeout: float = 5.0) -> GpuEvent:
        return self.queue.get(timeout=timeout)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def two_gpus() -> FakeNvml:
    second = FakeGpu(uuid="GPU-0f9e8d7c-6b5a-4938-2716-05f4e3d2c1b0", memory_used=2 * GiB)
    return FakeNvml([FakeGpu(), second])


@pytest.fixture
def monitor(two_gpus: FakeNvml, events: Events) -> Iterator[GpuMonitor]:
    mon = GpuMonitor(
        nvml=two_gpus.module, interval=3600, history=5, on_event=events, event_wait=0.1
    )
    yield mon
    mon.stop()
