"""Plans for `ftsup service install/uninstall/status`, and their execution.

A plan is data (the unit text, the commands, the notes) so that `--dry-run`
shows exactly what a real run does, and so that it can be printed as the
manual steps where systemd is not running.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor.service.units import (
    SYSTEM_STATE_DIR,
    SYSTEM_USER,
    UNIT_NAME,
    Scope,
    current_user,
    daemon_command,
    linger_enabled,
    render,
    system_user_exists,
    systemd_running,
    unit_path,
    unreachable_by_others,
    user_manager_reachable,
)

STATUS_PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "UnitFileState",
    "MainPID",
    "NRestarts",
    "StatusText",
    "ActiveEnterTimestamp",
)


@dataclass(frozen=True)
class Step:
    """One command of a plan, with the reason a person reading it needs."""

    argv: tuple[str, ...]
    why: str

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)

    def to_json(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "command": self.shell, "why": self.why}


@dataclass(frozen=True)
class StepResult:
    step: Step
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_json(self) -> dict[str, Any]:
        return {**self.step.to_json(), "returncode": self.returncode, "output": self.output}


@dataclass
class Plan:
    """What install or uninstall does: steps before and after the unit file changes."""

    scope: Scope
    unit_path: Path
    unit_text: str | None  # None: the unit file is removed
    previous_text: str | None
    before: list[Step] = field(default_factory=list)
    after: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changes_file(self) -> bool:
        return self.unit_text != self.previous_text

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": str(self.scope),
            "unit_path": str(self.unit_path),
            "unit": self.unit_text,
            "changes_file": self.changes_file,
            "before": [step.to_json() for step in self.before],
            "after": [step.to_json() for step in self.after],
            "notes": list(self.notes),
        }


def systemctl(scope: Scope, *args: str) -> tuple[str, ...]:
    return ("systemctl", *(["--user"] if scope is Scope.USER else []), *args)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def manager_problem(scope: Scope, env: Mapping[str, str] | None = None) -> str | None:
    """Why `systemctl` cannot act here, or None when it can."""
    if not systemd_running():
        return (
            "systemd is not running on this machine (no /run/systemd/system); "
            "containers and WSL1 usually have no init system"
        )
    if scope is Scope.USER and not user_manager_reachable(env):
        return (
            "your systemd user manager is not reachable (XDG_RUNTIME_DIR unset or without "
            "systemd/private); log in directly (ssh) rather than through su/sudo, or set "
            "XDG_RUNTIME_DIR=/run/user/$(id -u)"
        )
    return None


def plan_install(
    scope: Scope,
    *,
    start: bool = True,
    linger: bool = False,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan:
    argv = list(command) if command is not None else daemon_command()
    path = unit_path(scope, env)
    plan = Plan(scope, path, render(scope, argv), _read(path))
    if scope is Scope.SYSTEM:
        if not system_user_exists():
            plan.before.append(
                Step(
                    (
                        "useradd",
                        "--system",
                        "--user-group",
                        "--home-dir",
                        str(SYSTEM_STATE_DIR),
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        SYSTEM_USER,
                    ),
                    f"the system unit runs as the dedicated user {SYSTEM_USER!r}",
                )
            )
        if blocked := unreachable_by_others(Path(argv[0])):
            plan.notes.append(
                f"{blocked} cannot be entered by other users, so the {SYSTEM_USER!r} user "
                f"cannot start {argv[0]} (the unit would fail with 203/EXEC); install ftsup "
                "somewhere readable, e.g. a venv in /opt/ftsup"
            )
        plan.notes.append(
            f"runs execute as {SYSTEM_USER!r}: their output_dir, datasets and models "
            "must be writable/readable by that user"
        )
    plan.after.append(Step(systemctl(scope, "daemon-reload"), "load the new unit file"))
    enable = ("enable", "--now", UNIT_NAME) if start else ("enable", UNIT_NAME)
    plan.after.append(
        Step(systemctl(scope, *enable), "start at boot" + (" and now" if start else ""))
    )
    if scope is Scope.USER:
        user = current_user()
        if linger:
            plan.after.append(
                Step(
                    ("loginctl", "enable-linger", user),
                    "keep your user manager, ftsup and its runs alive after you log out",
                )
            )
        elif not linger_enabled(user):
            plan.notes.append(
                "lingering is off for this user: when your last session (e.g. SSH) ends, "
                "systemd stops your user manager and every run with it, and nothing starts "
                f"at boot. Run `loginctl enable-linger {user}` (or pass --linger)."
            )
    if plan.previous_text is not None and plan.changes_file:
        plan.notes.append(
            f"the unit changed; `{shlex.join(systemctl(scope, 'restart', UNIT_NAME))}` "
            "applies it to a running daemon (runs keep training)"
        )
    return plan


def plan_uninstall(scope: Scope, env: Mapping[str, str] | None = None) -> Plan:
    path = unit_path(scope, env)
    plan = Plan(scope, path, None, _read(path))
    plan.before.append(
        Step(systemctl(scope, "disable", "--now", UNIT_NAME), "stop the daemon, no start at boot")
    )
    plan.after.append(Step(systemctl(scope, "daemon-reload"), "forget the removed unit"))
    plan.notes.append(
        "runs that are training keep training, unsupervised (KillMode=process); stop them "
        "first with `ftsup stop` if that is not what you want. The state dir is kept."
    )
    return plan


def run_step(step: Step, timeout: float = 120.0) -> StepResult:
    try:
        done = subprocess.run(
            step.argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        return StepResult(step, 127, str(exc))
    except subprocess.TimeoutExpired:
        return StepResult(step, 124, f"timed out after {timeout:.0f}s")
    return StepResult(step, done.returncode, (done.stdout + done.stderr).strip())


def run_steps(steps: Sequence[Step]) -> list[StepResult]:
    """Run in order; stop at the first failure (later steps depend on earlier ones)."""
    results: list[StepResult] = []
    for step in steps:
        results.append(run_step(step))
        if not results[-1].ok:
            break
    return results


def write_unit(path: Path, text: str) -> None:
    """Atomically: systemd must never read half a unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def service_properties(scope: Scope) -> dict[str, str]:
    """`systemctl show` of the unit; empty when systemctl cannot answer."""
    step = Step(
        systemctl(scope, "show", UNIT_NAME, "--property=" + ",".join(STATUS_PROPERTIES)), ""
    )
    result = run_step(step, timeout=30)
    if not result.ok:
        return {}
    pairs = (line.partition("=") for line in result.output.splitlines())
    return {key: value for key, _, value in pairs if key}


def status_report(scope: Scope, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What is installed in `scope`, whether it is current, and what systemd says."""
    path = unit_path(scope, env)
    text = _read(path)
    report: dict[str, Any] = {
        "scope": str(scope),
        "unit_path": str(path),
        "installed": text is not None,
        "current": text is not None and text == render(scope),
        "manager_problem": manager_problem(scope, env),
    }
    if text is not None and report["manager_problem"] is None:
        report["systemd"] = service_properties(scope)
    if scope is Scope.USER:
        report["linger"] = linger_enabled(current_user())
    return report
