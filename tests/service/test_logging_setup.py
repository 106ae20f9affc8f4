"""Daemon log lines: `<N>` priorities and no timestamps under journald, timestamps elsewhere."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.supervisor.service.logging_setup import setup_daemon_logging, under_journald

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

SCRIPT = textwrap.dedent(
    """
    import logging
    from ftsup.supervisor.service.logging_setup import setup_daemon_logging
    setup_daemon_logging("DEBUG")
    log = logging.getLogger("ftsup.daemon")
    log.debug("polling")
    log.info("2 runs re-adopted")
    log.warning("GPU 1 throttling")
    log.error("run qwen-lora failed")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("tick crashed")
    """
)


def run_daemon_like(stderr_file: Path, journal_stream: str | None) -> list[str]:
    """A real process whose stderr is a file, as systemd would connect it to the journal."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with stderr_file.open("w") as stderr:
        if journal_stream == "match":
            info = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run(
            [sys.executable, "-c", SCRIPT], stderr=stderr, env=env, timeout=30, check=True
        )
    return stderr_file.read_text().splitlines()


def test_journald_prefixes_without_timestamps(tmp_path: Path) -> None:
    lines = run_daemon_like(tmp_path / "stderr", "match")
    assert lines[:4] == [
        "<7>ftsup.daemon: polling",
        "<6>ftsup.daemon: 2 runs re-adopted",
        "<4>ftsup.daemon: GPU 1 throttling",
        "<3>ftsup.daemon: run qwen-lora failed",
    ]
    assert lines[4] == "<3>ftsup.daemon: tick crashed"
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in lines[4:])  # one priority per traceback line
    assert not any(TIMESTAMP.search(line) for line in lines)


@pytest.mark.parametrize("journal_stream", [None, "1:2", "junk"])
def test_timestamps_elsewhere(tmp_path: Path, journal_stream: str | None) -> None:
    # Unset, or inherited from a unit while stderr went elsewhere: plain lines.
    lines = run_daemon_like(tmp_path / "stderr", journal_stream)
    assert TIMESTAMP.match(lines[0]) and lines[0].endswith("DEBUG   ftsup.daemon: polling")
    assert "WARNING ftsup.daemon: GPU 1 throttling" in lines[2]
    assert not any(line.startswith("<") for line in lines)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def test_setup_in_process_replaces_its_handler(tmp_path: Path, root_logger: logging.Logger) -> None:
    with (tmp_path / "log").open("w") as stream:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert under_journald(stream, env)
        setup_daemon_logging("INFO", stream=stream, env=env)
        setup_daemon_logging("INFO", stream=stream, env=env)
        logging.getLogger("ftsup.test").info("once")
        logging.getLogger("ftsup.test").debug("hidden")
    assert (tmp_path / "log").read_text() == "<6>ftsup.test: once\n"
    assert not under_journald(stream=None, env={})
