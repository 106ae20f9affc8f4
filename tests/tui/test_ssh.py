"""`--host`: the ssh commands, and the tunnel's lifecycle through a stand-in ssh.

The stand-in (fake_ssh.py) forwards the socket for real, so the last test runs
the real app over the "tunnel" against a real daemon.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.tui.app import FtsupApp
from ftsup.tui.connection import DaemonConnection
from ftsup.tui.ssh import (
    REMOTE_SOCKET_SCRIPT,
    SshTunnel,
    TunnelError,
    forward_command,
    remote_socket_command,
)
from tests.supervisor_harness import Harness, wait_for

FAKE_SSH = (sys.executable, str(Path(__file__).parent / "fake_ssh.py"))


def test_forward_command_forwards_the_unix_socket() -> None:
    command = forward_command(
        "me@gpu-box",
        Path("/tmp/x/ftsup.sock"),
        "/run/user/1000/ftsup/ftsup.sock",
        options=["-o", "Port=2222"],
    )
    assert command[0] == "ssh" and command[-1] == "me@gpu-box"
    assert "-N" in command
    assert command[command.index("-L") + 1] == "/tmp/x/ftsup.sock:/run/user/1000/ftsup/ftsup.sock"
    options = [command[i + 1] for i, part in enumerate(command) if part == "-o"]
    assert "ExitOnForwardFailure=yes" in options and "StreamLocalBindUnlink=yes" in options
    assert "Port=2222" in options


def test_remote_socket_command_runs_the_script_in_sh() -> None:
    command = remote_socket_command("me@gpu-box")
    assert command[:2] == ["ssh", "-T"] and command[2] == "me@gpu-box"
    assert shlex.split(command[-1]) == ["sh", "-c", REMOTE_SOCKET_SCRIPT]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FTSUP_RUNTIME_DIR": "/run/ftsup"}, "/run/ftsup/ftsup.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/ftsup/ftsup.sock"),
        ({}, f"/tmp/ftsup-{os.getuid()}/ftsup.sock"),
    ],
)
def test_the_remote_script_finds_the_socket_like_the_daemon(
    env: dict[str, str], expected: str
) -> None:
    """The script, run by a real sh, agrees with ftsup.supervisor.paths."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("FTSUP_RUNTIME_DIR", "XDG_RUNTIME_DIR")
    }
    remote_command = remote_socket_command("host")[-1]
    out = subprocess.run(
        ["sh", "-c", remote_command],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == expected
    from ftsup.supervisor.paths import Layout

    saved = {k: os.environ.pop(k, None) for k in ("FTSUP_RUNTIME_DIR", "XDG_RUNTIME_DIR")}
    try:
        os.environ.update(env)
        assert str(Layout.from_env().socket) == expected
    finally:
        for key in ("FTSUP_RUNTIME_DIR", "XDG_RUNTIME_DIR"):
            os.environ.pop(key, None)
            if saved[key] is not None:
                os.environ[key] = saved[key]  # type: ignore[assignment]


@pytest.fixture
def fake_ssh_env(tmp_path: Path) -> Iterator[Path]:
    old = {k: os.environ.get(k) for k in ("FAKE_SSH_REMOTE_SOCKET", "FAKE_SSH_FAIL")}
    yield tmp_path
    for key, value in old.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


def test_ssh_failure_is_reported_with_its_own_words(fake_ssh_env: Path) -> None:
    os.environ["FAKE_SSH_FAIL"] = "1"
    tunnel = SshTunnel("me@server", "/run/ftsup/ftsup.sock", ssh=FAKE_SSH, timeout=10)
    with pytest.raises(TunnelError, match="Connection refused"):
        tunnel.open()
    assert tunnel.folder is None and tunnel.process is None  # nothing left behind
    with pytest.raises(TunnelError, match="pass --remote-socket"):
        SshTunnel("me@server", ssh=FAKE_SSH, timeout=10).resolve_remote_socket()


async def test_the_app_runs_over_the_tunnel_and_cleans_up(
    daemon: Harness, fake_ssh_env: Path
) -> None:
    remote = daemon.runtime_dir / "ftsup.sock"
    os.environ["FAKE_SSH_REMOTE_SOCKET"] = str(remote)
    spec = daemon.toy_job("remote", "--max-steps", "2000", "--step-time", "0.05")
    daemon.cli("start", str(spec))
    tunnel = SshTunnel("me@server", ssh=FAKE_SSH, timeout=10)
    local = await asyncio.to_thread(tunnel.open)
    try:
        assert tunnel.remote_socket == str(remote)  # resolved "on the server"
        assert local.exists() and local != remote
        app = FtsupApp(
            DaemonConnection(local, before_reconnect=tunnel.ensure_running, backoff_max=0.5)
        )
        async with app.run_test(size=(100, 30)) as pilot:
            await asyncio.wait_for(app.synced.wait(), 20)
            assert "remote" in app.state.jobs
            # The network drops: ssh dies. The TUI reconnects through a new one.
            assert tunnel.process is not None
            tunnel.process.kill()
            await asyncio.to_thread(tunnel.process.wait)
            deadline = asyncio.get_running_loop().time() + 20
            while app.state.connection.state != "reconnecting":
                assert asyncio.get_running_loop().time() < deadline
                await pilot.pause(0.05)
            while not (app.state.connection.state == "connected" and tunnel.running()):
                assert asyncio.get_running_loop().time() < deadline, "no reconnect"
                await pilot.pause(0.05)
    finally:
        process = tunnel.process
        folder = tunnel.folder
        tunnel.close()
    assert process is not None and process.poll() is not None
    assert folder is not None and not folder.exists()
    wait_for(lambda: not local.exists(), 5, what="the local socket to go")
