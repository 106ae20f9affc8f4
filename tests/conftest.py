from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.supervisor_harness import Harness


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def daemon(harness: Harness) -> Harness:
    harness.start_daemon()
    return harness
