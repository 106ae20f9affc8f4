"""Trust only your own files: the checks that keep another user out of ftsup.

The state folder holds job files with `[command] env` secrets; the runtime
folder holds the socket every command is sent to. As ssh-agent and tmux do,
ftsup uses such a folder only when it belongs to the user and nobody else can
write into it (anyone who can create entries there could have planted a fake
socket, database or log symlink). A folder that merely lets others *read* is
tightened to 0700, but only when it is ours: never `chmod` what someone else
owns. The daemon also runs under umask 077, so whatever it creates in its
folders is private whatever the user's umask is.

The one folder owned by another user that is trusted is one that only root
could have created, e.g. `/run/ftsup` made by systemd for the system unit's
`ftsup` user: every folder above it belongs to root and is closed to writes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from ftsup.supervisor.contract import ENV_RUNTIME_DIR, ENV_STATE_DIR

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
DAEMON_UMASK = 0o077

_user_umask: int | None = None


class NotPrivate(Exception):
    """A folder ftsup must not use; `hint` says how to fix it."""

    def __init__(self, path: Path, problem: str, hint: str) -> None:
        super().__init__(f"{path} {problem}; ftsup will not use it. {hint}")
        self.path = path
        self.problem = problem
        self.hint = hint


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def set_daemon_umask() -> int:
    """Make everything this process creates private; returns (and remembers) the
    user's umask, which trainers must get back (see `user_umask`)."""
    global _user_umask
    previous = os.umask(DAEMON_UMASK)
    if _user_umask is None:
        _user_umask = previous
    return previous


def user_umask() -> int:
    """The umask the daemon was started with: what shims and trainers run under,
    so that checkpoints get the modes the user expects."""
    if _user_umask is not None:
        return _user_umask
    current = os.umask(DAEMON_UMASK)
    os.umask(current)
    return current


def _root_only(path: Path) -> bool:
    """True when every folder from `path` up to `/` belongs to root and is closed
    to writes by others: only root could have put anything there."""
    for folder in [path, *path.parents]:
        try:
            info = os.stat(folder)
        except OSError:
            return False
        if info.st_uid != 0 or info.st_mode & 0o022:
            return False
    return True


def _stat_folder(path: Path) -> os.stat_result:
    """lstat, following a symlink only when the link itself is ours or root's
    (a link someone else made in /tmp could be swapped at any moment)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        if info.st_uid not in (os.geteuid(), 0):
            raise NotPrivate(
                path,
                f"is a symbolic link made by {user_name(info.st_uid)}",
                f"Remove it (`rm {path}`) or choose another folder.",
            )
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotPrivate(
            path, "is not a folder", f"Remove it (`rm {path}`) or choose another folder."
        )
    return info


def _foreign_hint(path: Path, env_var: str) -> str:
    return (
        f"Another user may be posing as your ftsup daemon. Remove the folder (as root: "
        f"`rm -r {path}`) or point {env_var} (or --{env_var.split('_')[1].lower()}-dir) "
        f"at a folder of your own, e.g. set {_XDG_FOR.get(env_var, 'XDG_RUNTIME_DIR')}."
    )


_XDG_FOR = {ENV_STATE_DIR: "XDG_STATE_HOME", ENV_RUNTIME_DIR: "XDG_RUNTIME_DIR"}


def ensure_private_dir(path: Path, *, env_var: str = ENV_STATE_DIR) -> None:
    """Create `path` (0700) or check an existing one: ours, not writable by others;
    tightened to 0700 when others may read it. For the folders the daemon writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, PRIVATE_DIR_MODE)
    info = _stat_folder(path)
    euid = os.geteuid()
    if info.st_uid != euid:
        raise NotPrivate(
            path,
            f"belongs to {user_name(info.st_uid)}, not to you ({user_name(euid)})",
            _foreign_hint(path, env_var),
        )
    if info.st_mode & 0o022:
        raise NotPrivate(
            path,
            f"can be written by others (mode {stat.S_IMODE(info.st_mode):04o})",
            f"Someone may have planted files in it: check its contents, then `chmod 700 {path}`.",
        )
    if stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)


def trusted_uids(runtime_dir: Path) -> frozenset[int] | None:
    """The uids a client may believe on a socket in `runtime_dir`: its own and root,
    plus the folder's owner when only root could have made it (the system unit).
    None when the folder does not exist (no daemon). Raises NotPrivate when the
    folder is someone else's, or open to writes by others."""
    try:
        info = _stat_folder(runtime_dir)
    except FileNotFoundError:
        return None
    euid = os.geteuid()
    trusted = {euid, 0}
    if info.st_uid not in trusted:
        if not _root_only(runtime_dir.parent):
            raise NotPrivate(
                runtime_dir,
                f"belongs to {user_name(info.st_uid)}, not to you ({user_name(euid)})",
                _foreign_hint(runtime_dir, ENV_RUNTIME_DIR),
            )
        trusted.add(info.st_uid)
    if info.st_mode & 0o022:
        raise NotPrivate(
            runtime_dir,
            f"can be written by others (mode {stat.S_IMODE(info.st_mode):04o})",
            "Anyone could have put a socket there: remove the folder, or "
            f"`chmod 700 {runtime_dir}` if it is yours.",
        )
    return frozenset(trusted)


def open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file of the state folder, never through a symlink;
    an existing file of ours is tightened to 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten_file(path: Path) -> None:
    """Make an existing file of ours 0600 (never through a symlink); absent is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return
    try:
        info = os.fstat(fd)
        if (
            stat.S_ISREG(info.st_mode)
            and info.st_uid == os.geteuid()
            and stat.S_IMODE(info.st_mode) & 0o077
        ):
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
