"""The distribution: every source module ships, under the ftsup namespace, and the
daemon's import graph never pulls in torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"supervisor": "ftsup/supervisor", "tui": "ftsup/tui", "trainer": "ftsup/trainer"}


def test_wheel_contains_every_module_under_the_ftsup_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ftsup-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, target in SOURCES.items()
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(expected - names)
    assert not missing, (
        f"modules missing from the wheel (add their package to pyproject): {missing}"
    )
    assert not any(name.startswith("supervisor/") for name in names)  # no top-level `supervisor`


def test_daemon_cli_and_tui_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import ftsup.supervisor.daemon.app, ftsup.supervisor.cli.main, ftsup.tui.app\n"
        "import ftsup.supervisor.daemon.launcher, ftsup.supervisor.trainer_launch\n"
        "from ftsup.supervisor.cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
