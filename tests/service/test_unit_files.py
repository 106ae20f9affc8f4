"""The checked-in units pass `systemd-analyze verify` once @FTSUP_BIN@ names a real path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.requirements import require_tool

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = {"system": UNIT_DIR / "ftsup.service", "user": UNIT_DIR / "ftsup-user.service"}


def _ftsup_bin() -> str:
    script = Path(sys.executable).parent / "ftsup"
    return str(script if os.access(script, os.X_OK) else Path(sys.executable))


def verify(unit: Path, *, user: bool, home: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of `unit`; the calling test fails if the tool is missing."""
    analyze = require_tool("systemd-analyze", "install it with `bash .ci/install-systemd.sh`")
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    argv = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scope", ["system", "user"])
def test_checked_in_unit_verifies(scope: str, short_tmp: Path) -> None:
    text = UNITS[scope].read_text()
    assert text.count("@FTSUP_BIN@") == 1
    unit = short_tmp / "ftsup.service"
    unit.write_text(text.replace("@FTSUP_BIN@", _ftsup_bin()))
    result = verify(unit, user=scope == "user", home=short_tmp)
    assert result.returncode == 0, result.stderr
    # Unknown keys are only warnings for systemd; they must not be there either.
    assert result.stderr.strip() == "", result.stderr


def test_verify_rejects_a_missing_executable(short_tmp: Path) -> None:
    unit = short_tmp / "ftsup.service"
    unit.write_text(UNITS["system"].read_text().replace("@FTSUP_BIN@", "/nonexistent/ftsup"))
    result = verify(unit, user=False, home=short_tmp)
    assert result.returncode != 0
    assert "/nonexistent/ftsup" in result.stderr


@pytest.mark.parametrize("scope", ["system", "user"])
def test_units_keep_runs_alive(scope: str) -> None:
    lines = {line.strip() for line in UNITS[scope].read_text().splitlines()}
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=always",
        "KillMode=process",
        "RuntimeDirectory=ftsup",
        "RuntimeDirectoryPreserve=yes",
    ):
        assert expected in lines, expected
