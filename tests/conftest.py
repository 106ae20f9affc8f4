from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor_harness import Harness

_MEMORY_FOLDERS = pytest.StashKey[set[Path]]()


def _daemon_memory_folders() -> set[Path]:
    """The /dev/shm folders of this user's daemons (`memory_tier.shm_folder`)."""
    return set(Path("/dev/shm").glob(f"ftsup-{os.geteuid()}-*"))


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_MEMORY_FOLDERS] = _daemon_memory_folders()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the /dev/shm folders the tests' daemons made (a daemon whose runtime
    folder is not tmpfs keeps its snapshots there; a test that builds a runner makes
    one too). Only on the controller, once every worker is done, and only folders
    that were not there before and hold no file: never a real daemon's snapshots."""
    if hasattr(session.config, "workerinput"):
        return
    before: set[Path] = session.config.stash.get(_MEMORY_FOLDERS, set())
    for folder in _daemon_memory_folders() - before:
        if not any(path.is_file() for path in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that train real models (a `slow` test) run first. Under xdist
    (`-n 2 --dist loadfile`, pyproject.toml) each module goes whole to one worker
    in this order; the many short modules then fill the gaps at the end instead
    of one long module running alone while the other worker idles. (Stable sort:
    each module's own order, and the modules' within each group, are kept.)"""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """Remember each phase's outcome on the test item (the harness reads it)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            # The daemon's own log explains most failures; show it with the test's output.
            print(f"--- daemon log ({h.state_dir}) ---\n{h.daemon_log()[-6000:]}")
        h.cleanup()


@pytest.fixture
def daemon(harness: Harness) -> Harness:
    harness.start_daemon()
    return harness


@pytest.fixture
def fake_daemon() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose life stands for a daemon's (a standby shim watches it)."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny Llama (and tokenizer) per test module, for unmodified HF scripts."""
    from ftsup.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "llama", hidden=32, heads=2)
