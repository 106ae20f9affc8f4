"""`ftsup service` in a real process, with HOME in a temp dir (no systemd manager here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftsup.supervisor.service.install import plan_install, plan_uninstall
from ftsup.supervisor.service.units import (
    TEMPLATE_FILES,
    TEMPLATES,
    Scope,
    daemon_command,
    quote_exec,
    render,
    unit_path,
    unreachable_by_others,
)

from .conftest import needs_systemd_analyze
from .test_unit_files import UNIT_DIR, verify

# The lead registers service_cmd in cli/main.py; until then the tests build the parser.
CLI = """
import argparse, sys
from ftsup.supervisor.cli import service_cmd
parser = argparse.ArgumentParser(prog="ftsup")
service_cmd.register(parser.add_subparsers(required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def ftsup(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", CLI, "service", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("scope", list(Scope))
def test_checked_in_units_match_templates(scope: Scope) -> None:
    checked_in = (UNIT_DIR / TEMPLATE_FILES[scope]).read_text()
    assert checked_in == TEMPLATES[scope], "systemd/ and service/units.py drifted apart"


def test_daemon_command_prefers_the_venv_script(short_tmp: Path) -> None:
    bindir = short_tmp / "my venv" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.symlink_to(sys.executable)
    assert daemon_command(str(python)) == [str(python), "-m", "ftsup.supervisor", "daemon"]
    script = bindir / "ftsup"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert daemon_command(str(python)) == [str(script), "daemon"]


def test_quote_exec() -> None:
    assert quote_exec(["/opt/ftsup/bin/ftsup", "daemon"]) == "/opt/ftsup/bin/ftsup daemon"
    assert quote_exec(["/a b/py", 'x"y', "50%", "$HOME"]) == '"/a b/py" "x\\"y" 50%% "$$HOME"'
    with pytest.raises(ValueError):
        render(Scope.USER, ["ftsup", "daemon"])


@needs_systemd_analyze
def test_rendered_unit_with_awkward_path_verifies(short_tmp: Path) -> None:
    bindir = short_tmp / "my venv%1" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.symlink_to(sys.executable)
    unit = short_tmp / "ftsup.service"
    unit.write_text(render(Scope.SYSTEM, daemon_command(str(python))))
    assert f'ExecStart="{short_tmp}/my venv%%1/bin/python" -m' in unit.read_text()
    result = verify(unit, user=False, home=short_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unreachable_by_others(short_tmp: Path) -> None:
    private = short_tmp / "private"
    (private / "venv" / "bin").mkdir(parents=True)
    private.chmod(0o700)
    short_tmp.chmod(0o755)
    assert unreachable_by_others(private / "venv" / "bin" / "ftsup") == private
    (short_tmp / "open" / "bin").mkdir(parents=True)
    assert unreachable_by_others(short_tmp / "open" / "bin" / "ftsup") is None


def test_plans() -> None:
    env = {"HOME": "/home/ada"}
    plan = plan_install(Scope.USER, linger=True, command=["/opt/f/bin/ftsup", "daemon"], env=env)
    assert plan.unit_path == Path("/home/ada/.config/systemd/user/ftsup.service")
    assert [step.shell for step in plan.after][:2] == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now ftsup.service",
    ]
    assert plan.after[2].argv[:2] == ("loginctl", "enable-linger")
    assert "ExecStart=/opt/f/bin/ftsup daemon\n" in (plan.unit_text or "")
    system = plan_install(Scope.SYSTEM, start=False, command=["/opt/f/bin/ftsup", "daemon"])
    assert system.unit_path == Path("/etc/systemd/system/ftsup.service")
    assert system.after[-1].shell == "systemctl enable ftsup.service"
    assert plan_uninstall(Scope.SYSTEM).before[0].shell == "systemctl disable --now ftsup.service"
    assert unit_path(Scope.USER, {"XDG_CONFIG_HOME": "/c", "HOME": "/h"}) == Path(
        "/c/systemd/user/ftsup.service"
    )


@needs_systemd_analyze
def test_user_install_status_uninstall(short_tmp: Path) -> None:
    home = short_tmp / "home"
    home.mkdir()
    installed = home / ".config" / "systemd" / "user" / "ftsup.service"

    dry = ftsup(home, "install", "--user", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        "would write" in dry.stdout and "systemctl --user enable --now ftsup.service" in dry.stdout
    )
    assert not installed.exists()

    done = ftsup(home, "install", "--user", "--json")
    report = json.loads(done.stdout)
    # No user manager is reachable here: the unit is written, nothing started, exit 1.
    assert done.returncode == 1, done.stderr
    assert report["written"] is True and report["results"] == []
    assert "not" in report["manager_problem"]
    assert installed.read_text() == render(Scope.USER)
    result = verify(installed, user=True, home=home)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr

    human = ftsup(home, "install", "--user", "--no-start")
    assert human.returncode == 0, human.stderr
    assert "systemctl --user daemon-reload" in human.stdout  # the manual commands

    status = ftsup(home, "status", "--user", "--json")
    assert status.returncode == 0, status.stderr
    (unit,) = json.loads(status.stdout)["units"]
    assert unit["installed"] and unit["current"]

    gone = ftsup(home, "uninstall", "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["scope"] == "user"
    assert not installed.exists()
    assert ftsup(home, "status", "--user").returncode == 4


def test_system_dry_run_writes_nothing(short_tmp: Path) -> None:
    target = Path("/etc/systemd/system/ftsup.service")
    existed = target.exists()
    done = ftsup(short_tmp, "install", "--system", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unit_path"] == str(target)
    assert "User=ftsup" in report["unit"]
    assert report["after"][-1]["command"] == "systemctl enable --now ftsup.service"
    assert target.exists() == existed
