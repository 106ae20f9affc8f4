"""`ftsup tui --host USER@SERVER`: forward the remote daemon's Unix socket over SSH.

    ssh -N -L /tmp/ftsup-tui-XXXX/ftsup.sock:/run/user/1000/ftsup/ftsup.sock USER@SERVER

OpenSSH (6.7+) forwards Unix sockets with `-L LOCAL_PATH:REMOTE_PATH`. The
remote path is asked for (`--remote-socket`) or resolved on the server the
same way the daemon chooses it (FTSUP_RUNTIME_DIR, else XDG_RUNTIME_DIR/ftsup,
else /tmp/ftsup-<uid>). The local socket lives in a private temporary folder;
`close()` stops ssh and removes both. If ssh dies while the TUI is open (the
network dropped), `ensure_running()` starts it again before each reconnect.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Mirrors ftsup.supervisor.paths.default_runtime_dir, evaluated by the server's sh.
REMOTE_SOCKET_SCRIPT = (
    'if [ -n "$FTSUP_RUNTIME_DIR" ]; then d="$FTSUP_RUNTIME_DIR"; '
    'elif [ -n "$XDG_RUNTIME_DIR" ]; then d="$XDG_RUNTIME_DIR/ftsup"; '
    'else d="/tmp/ftsup-$(id -u)"; fi; printf "%s/ftsup.sock\\n" "$d"'
)
FORWARD_OPTIONS = (
    "-o",
    "ExitOnForwardFailure=yes",  # no socket, no tunnel: fail instead of idling
    "-o",
    "StreamLocalBindUnlink=yes",  # replace a stale local socket
    "-o",
    "ServerAliveInterval=15",  # notice a dead network within a minute
    "-o",
    "ServerAliveCountMax=4",
)


class TunnelError(Exception):
    """ssh could not set up the forwarding; the message carries ssh's own words."""


def remote_socket_command(
    host: str, *, ssh: Sequence[str] = ("ssh",), options: Sequence[str] = ()
) -> list[str]:
    """The command that prints the daemon socket path on `host`."""
    return [*ssh, "-T", *options, host, "sh -c " + shlex.quote(REMOTE_SOCKET_SCRIPT)]


def forward_command(
    host: str,
    local: Path,
    remote: str,
    *,
    ssh: Sequence[str] = ("ssh",),
    options: Sequence[str] = (),
) -> list[str]:
    """The ssh command that forwards `local` (a path here) to `remote` (a path there)."""
    return [*ssh, "-N", "-T", *FORWARD_OPTIONS, *options, "-L", f"{local}:{remote}", host]


class SshTunnel:
    def __init__(
        self,
        host: str,
        remote_socket: str | None = None,
        *,
        ssh: Sequence[str] = ("ssh",),
        options: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.remote_socket = remote_socket
        self.ssh = tuple(ssh)
        self.options = tuple(options)
        self.timeout = timeout
        self.folder: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def local_socket(self) -> Path:
        assert self.folder is not None, "open() first"
        return self.folder / "ftsup.sock"

    def resolve_remote_socket(self) -> str:
        command = remote_socket_command(self.host, ssh=self.ssh, options=self.options)
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise TunnelError(
                f"ssh {self.host} did not answer within {self.timeout:.0f}s"
            ) from None
        except FileNotFoundError:
            raise TunnelError(f"cannot run {self.ssh[0]!r}: is OpenSSH installed?") from None
        path = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
        if not path or not path[0].startswith("/"):
            raise TunnelError(
                f"could not find the daemon socket on {self.host} "
                f"(ssh exited {result.returncode}): {result.stderr.strip()} "
                "— pass --remote-socket PATH"
            )
        return path[0]

    def open(self) -> Path:
        """Start ssh and wait until the local socket exists; returns its path."""
        if self.remote_socket is None:
            self.remote_socket = self.resolve_remote_socket()
        self.folder = Path(tempfile.mkdtemp(prefix="ftsup-tui-"))  # mode 0700
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self.local_socket

    def _start(self) -> None:
        assert self.folder is not None and self.remote_socket is not None
        with contextlib.suppress(FileNotFoundError):
            self.local_socket.unlink()
        errors = (self.folder / "ssh.err").open("wb")
        try:
            self.process = subprocess.Popen(
                forward_command(
                    self.host,
                    self.local_socket,
                    self.remote_socket,
                    ssh=self.ssh,
                    options=self.options,
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,  # a Ctrl+C in the TUI is not ssh's to handle
            )
        except FileNotFoundError:
            raise TunnelError(f"cannot run {self.ssh[0]!r}: is OpenSSH installed?") from None
        finally:
            errors.close()
        deadline = time.monotonic() + self.timeout
        while not self.local_socket.exists():
            code = self.process.poll()
            if code is not None:
                raise TunnelError(
                    f"ssh exited {code} before forwarding {self.remote_socket}: {self.ssh_errors()}"
                )
            if time.monotonic() > deadline:
                raise TunnelError(
                    f"ssh did not open {self.local_socket} within "
                    f"{self.timeout:.0f}s: {self.ssh_errors()}"
                )
            time.sleep(0.05)

    def ssh_errors(self) -> str:
        if self.folder is None:
            return ""
        try:
            return (self.folder / "ssh.err").read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> None:
        """Start ssh again if it died (called before each reconnect attempt)."""
        if self.folder is not None and not self.running():
            with contextlib.suppress(TunnelError):
                self._start()

    def close(self) -> None:
        """Stop ssh and remove the local socket and its folder (idempotent)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(3)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> SshTunnel:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
