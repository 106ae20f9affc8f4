"""The unit files: their text, the paths of this installation, and where they go.

The templates below are the source of the checked-in `systemd/*.service`
files (a test keeps them identical), so that a wheel install can render them
without data files. `@FTSUP_BIN@` becomes the command that starts this very
installation: the `ftsup` script next to `sys.executable`.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path

UNIT_NAME = "ftsup.service"
PLACEHOLDER = "@FTSUP_BIN@"
SYSTEM_USER = "ftsup"
SYSTEM_STATE_DIR = Path("/var/lib/ftsup")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEMD_RUNNING_MARKER = Path("/run/systemd/system")  # what sd_booted() checks
LINGER_DIR = Path("/var/lib/systemd/linger")


class Scope(StrEnum):
    SYSTEM = "system"
    USER = "user"


SYSTEM_TEMPLATE = """\
# ftsup daemon, system-wide. `ftsup service install --system` fills in the ExecStart placeholder
# with this installation's `ftsup` and writes the result to /etc/systemd/system/.
#
# KillMode=process: stopping or restarting this unit signals the daemon only.
# Runs (shim + trainer, each in its own session) keep training, and the next
# daemon re-adopts them. See docs/service.md for the trade-offs.

[Unit]
Description=ftsup supervisor for long-running fine-tuning jobs
Wants=network-online.target
After=network-online.target remote-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=@FTSUP_BIN@ daemon
User=ftsup
Group=ftsup
StateDirectory=ftsup
StateDirectoryMode=0750
RuntimeDirectory=ftsup
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
Environment=FTSUP_STATE_DIR=/var/lib/ftsup FTSUP_RUNTIME_DIR=/run/ftsup PYTHONUNBUFFERED=1

# The daemon sends WATCHDOG=1 from its event loop after a liveness check;
# a stuck loop gets it killed and restarted. The runs are not touched.
WatchdogSec=30
Restart=always
RestartSec=2
TimeoutStartSec=2min
TimeoutStopSec=30

# Leave the runs alone on stop/restart; only the daemon gets SIGTERM.
KillMode=process
# A trainer killed by the kernel's OOM killer is a run failure for ftsup to
# judge, not a reason for systemd to stop the whole service.
OOMPolicy=continue

# Trainers inherit these: NCCL and pinned-memory data loaders need them.
LimitNOFILE=1048576
LimitMEMLOCK=infinity

[Install]
WantedBy=multi-user.target
"""

USER_TEMPLATE = """\
# ftsup daemon for one user. `ftsup service install --user` fills in the ExecStart placeholder
# and writes the result to ~/.config/systemd/user/ftsup.service.
# Runs outlive the login session only with `loginctl enable-linger $USER`.
#
# KillMode=process: stopping or restarting this unit signals the daemon only;
# runs keep training and the next daemon re-adopts them (docs/service.md).

[Unit]
Description=ftsup supervisor for long-running fine-tuning jobs (user)

[Service]
Type=notify
NotifyAccess=main
ExecStart=@FTSUP_BIN@ daemon
# %t is $XDG_RUNTIME_DIR; the state dir is what `ftsup` uses by default.
RuntimeDirectory=ftsup
RuntimeDirectoryPreserve=yes
Environment=FTSUP_STATE_DIR=%h/.local/state/ftsup FTSUP_RUNTIME_DIR=%t/ftsup PYTHONUNBUFFERED=1

WatchdogSec=30
Restart=always
RestartSec=2
TimeoutStartSec=2min
TimeoutStopSec=30

KillMode=process
OOMPolicy=continue

[Install]
WantedBy=default.target
"""

TEMPLATES = {Scope.SYSTEM: SYSTEM_TEMPLATE, Scope.USER: USER_TEMPLATE}
TEMPLATE_FILES = {Scope.SYSTEM: "ftsup.service", Scope.USER: "ftsup-user.service"}


def daemon_command(executable: str | None = None) -> list[str]:
    """argv that starts this installation's daemon.

    The console script beside the interpreter keeps the venv without activating
    it; without one (a source checkout), `python -m ftsup.supervisor` does the same.
    """
    python = Path(executable or sys.executable)
    script = python.parent / "ftsup"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "daemon"]
    return [str(python), "-m", "ftsup.supervisor", "daemon"]


_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def quote_exec(argv: Sequence[str]) -> str:
    """An ExecStart= command line: quoted where needed, `%` and `$` escaped."""
    words = []
    for arg in argv:
        word = arg if _PLAIN_WORD.match(arg) else '"' + re.sub(r'(["\\])', r"\\\1", arg) + '"'
        words.append(word.replace("%", "%%").replace("$", "$$"))
    return " ".join(words)


def render(scope: Scope, command: Sequence[str] | None = None) -> str:
    """The unit text for `scope`, with `ExecStart=` running `command`."""
    argv = list(command) if command is not None else daemon_command()
    if not argv or not Path(argv[0]).is_absolute():
        raise ValueError(f"ExecStart= needs an absolute executable, got {argv[:1]!r}")
    template = TEMPLATES[scope]
    # The template's ExecStart is "@FTSUP_BIN@ daemon": the command replaces both words.
    return template.replace(f"{PLACEHOLDER} daemon", quote_exec(argv), 1)


def unit_dir(scope: Scope, env: Mapping[str, str] | None = None) -> Path:
    """Where systemd looks for units of this administrator or user."""
    if scope is Scope.SYSTEM:
        return SYSTEM_UNIT_DIR
    env = os.environ if env is None else env
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config) / "systemd" / "user"


def unit_path(scope: Scope, env: Mapping[str, str] | None = None) -> Path:
    return unit_dir(scope, env) / UNIT_NAME


def systemd_running() -> bool:
    """True when systemd is PID 1 here (not in most containers or WSL1)."""
    return SYSTEMD_RUNNING_MARKER.is_dir()


def user_manager_reachable(env: Mapping[str, str] | None = None) -> bool:
    """`systemctl --user` needs `XDG_RUNTIME_DIR`, which `su` and `sudo` do not set."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    return runtime is not None and (Path(runtime) / "systemd" / "private").exists()


def current_user() -> str:
    """The real login name (not `$USER`, which `sudo` may leave behind)."""
    return pwd.getpwuid(os.getuid()).pw_name


def linger_enabled(user: str) -> bool:
    return (LINGER_DIR / user).exists()


def system_user_exists(name: str = SYSTEM_USER) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def unreachable_by_others(path: Path) -> Path | None:
    """The first folder above `path` that other users cannot enter, if any.

    The system unit runs as `ftsup`, which must be able to reach the venv; a
    venv under /root or a 0700 home is the usual reason the unit fails with 203/EXEC.
    """
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except OSError:
            return parent
        if not mode & stat.S_IXOTH:
            return parent
    return None
