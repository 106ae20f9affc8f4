"""Trust only your own files (issue 12, defects 4 and 6).

Another uid must not be able to pose as the daemon (its folder, its socket
file, or the process behind the socket), and must not be able to read the
state: the folder is 0700 and its files 0600 whatever the umask, and the
values of `[command] env` are never printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftsup.supervisor.protocol import PROTOCOL_VERSION, encode_frame
from tests.supervisor_harness import Harness

NOBODY = 65534
SECRET = "hf_s3cr3t_t0ken_that_must_never_leak"
ENV_TABLE = f'\n[command.env]\nHF_TOKEN = "{SECRET}"\n'


def _require_root() -> None:
    assert os.geteuid() == 0, "these tests act as another uid: they must run as root"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# a fake daemon run by uid 65534 ------------------------------------------------
@dataclass
class FakeDaemon:
    pid: int
    ready: int  # read end: "ready\n" once listening
    received: int  # read end: every byte any client sent

    def stop(self) -> bytes:
        """Kill it (its own process group) and return all the bytes it was sent."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        chunks = []
        while chunk := os.read(self.received, 65536):
            chunks.append(chunk)
        os.close(self.received)
        os.close(self.ready)
        return b"".join(chunks)


def _serve_as_nobody(bind_dir: Path) -> FakeDaemon:
    """A process of uid 65534 listening on `bind_dir/ftsup.sock` that answers the
    handshake like a real daemon, then records whatever it is sent."""
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setsid()
            os.close(ready_r)
            os.close(got_r)
            os.setgid(NOBODY)
            os.setgroups([])
            os.setuid(NOBODY)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(bind_dir / "ftsup.sock"))
            server.listen(16)
            os.write(ready_w, b"ready\n")
            while True:
                conn, _ = server.accept()
                conn.settimeout(5)
                answered = False
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        os.write(got_w, data)
                        if not answered:
                            reply = {"type": "hello", "version": PROTOCOL_VERSION, "daemon_pid": 1}
                            conn.sendall(encode_frame(reply))
                            answered = True
                conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    fake = FakeDaemon(pid, ready_r, got_r)
    readable, _, _ = select.select([ready_r], [], [], 30)
    if not readable or os.read(ready_r, 16) != b"ready\n":
        fake.stop()
        raise AssertionError("the fake daemon (uid 65534) did not start")
    return fake


def _foreign_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    return path


@pytest.mark.parametrize("where", ["foreign-folder", "foreign-socket-file", "foreign-peer"])
def test_cli_sends_nothing_to_a_daemon_of_another_user(harness: Harness, where: str) -> None:
    """`ftsup start` must not hand the job (and its env secrets) to another uid.

    foreign-folder: the runtime folder itself belongs to uid 65534 (like a
    `/tmp/ftsup-<uid>` someone made first). foreign-socket-file: our folder, but
    the socket in it is 65534's. foreign-peer: our folder and a socket file we
    own, but the process listening on it is 65534's (only SO_PEERCRED tells)."""
    _require_root()
    os.chmod(harness.root, 0o711)  # uid 65534 may reach its folders below
    runtime = harness.runtime_dir
    if where == "foreign-folder":
        fake = _serve_as_nobody(_foreign_dir(runtime))
    else:
        runtime.mkdir(mode=0o700)
        fake = _serve_as_nobody(_foreign_dir(harness.root / "nobody"))
        os.rename(harness.root / "nobody" / "ftsup.sock", runtime / "ftsup.sock")
        if where == "foreign-peer":
            os.chown(runtime / "ftsup.sock", 0, 0)
    try:
        job = harness.toy_job("secretive", "--max-steps", "5", extra=ENV_TABLE)
        result = harness.cli("start", str(job), check=False, timeout=120)
    finally:
        received = fake.stop()
    assert received == b"", f"the CLI sent {len(received)} bytes to uid {NOBODY}: {received!r}"
    assert result.returncode == 5, result.stdout + result.stderr
    assert "65534" in result.stderr
    named = runtime if where == "foreign-folder" else runtime / "ftsup.sock"
    assert str(named) in result.stderr.replace("\n", "")
    assert not harness.state_dir.exists() or not list(harness.state_dir.glob("runs/*"))


def test_daemon_refuses_a_runtime_folder_of_another_user(harness: Harness) -> None:
    """The daemon neither binds in nor chmods a folder it does not own."""
    _require_root()
    harness.runtime_dir.mkdir(mode=0o755)
    os.chown(harness.runtime_dir, NOBODY, NOBODY)
    harness.state_dir.mkdir()
    daemon = subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", "daemon"],
        env=harness.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert daemon.returncode != 0, "the daemon started in another user's folder"
    assert str(harness.runtime_dir) in daemon.stderr and "65534" in daemon.stderr
    assert _mode(harness.runtime_dir) == 0o755, "the daemon chmod-ed a folder it does not own"
    assert not (harness.runtime_dir / "ftsup.sock").exists()


def test_state_is_private_whatever_the_umask_and_env_values_never_print(
    harness: Harness,
) -> None:
    _require_root()
    os.chmod(harness.root, 0o755)  # as a home folder is: others may traverse it
    job = harness.toy_job("secretive", "--max-steps", "8", extra=ENV_TABLE)
    with _umask(0o022):
        harness.cli("start", str(job))  # starts the daemon too (ensure_daemon)
    harness.wait_state("secretive", "finished", timeout=120)

    state = harness.state_dir
    assert _mode(state) == 0o700
    private_files = [
        state / "ftsup.db",
        state / "daemon.log",
        state / "runs" / "secretive" / "job.toml",
        *[state / f"ftsup.db-{suffix}" for suffix in ("wal", "shm")],
    ]
    for path in private_files:
        if path.exists() or path.name == "ftsup.db" or path.suffix == ".toml":
            assert _mode(path) == 0o600, f"{path} is {_mode(path):04o}"
    assert _mode(harness.runtime_dir) == 0o700

    readable = _readable_by_nobody([state / "ftsup.db", state / "runs" / "secretive" / "job.toml"])
    assert readable == [], f"uid 65534 could read {readable}"

    detail = harness.cli_json("status", "secretive")
    assert detail["env_keys"] == ["HF_TOKEN"]
    shown = [
        harness.cli("status", "secretive", "--json").stdout,
        harness.cli("status", "secretive").stdout,
        harness.cli("status", "--json").stdout,
        harness.cli("ls", "--json").stdout,
        harness.cli("events", "--json", "-n", "1000").stdout,
        harness.cli("events", "-n", "1000").stdout,
    ]
    for text in shown:
        assert SECRET not in text
    assert "HF_TOKEN" in harness.cli("status", "secretive").stdout


def test_trainer_files_keep_the_users_umask(harness: Harness) -> None:
    """The daemon's umask 077 is for its own state only: a trainer's checkpoints get
    the modes the user asked for (the daemon was started under umask 022)."""
    job = harness.toy_job("sharing", "--max-steps", "5")
    with _umask(0o022):
        harness.cli("start", str(job))
    harness.wait_state("sharing", "finished", timeout=120)
    steps_log = harness.work / "sharing" / "steps.log"
    assert _mode(steps_log) == 0o644


def _readable_by_nobody(paths: list[Path]) -> list[str]:
    """The paths a process of uid 65534 manages to open for reading."""
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(NOBODY)
            os.setgroups([])
            os.setuid(NOBODY)
            opened = []
            for path in paths:
                try:
                    with path.open("rb") as handle:
                        handle.read(1)
                    opened.append(str(path))
                except OSError:
                    pass
            os.write(read_w, json.dumps(opened).encode())
        finally:
            os._exit(0)
    os.close(read_w)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(read_r, 65536):
        data += chunk
    os.close(read_r)
    return list(json.loads(data or b'["child failed"]'))


def test_state_folder_open_to_writes_by_others_is_refused(harness: Harness) -> None:
    """A state folder others can write into may hold planted files: refuse it."""
    _require_root()
    harness.state_dir.mkdir(mode=0o777)
    os.chmod(harness.state_dir, 0o777)
    job = harness.toy_job("planted", "--max-steps", "5")
    result = harness.cli("start", str(job), check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert str(harness.state_dir) in result.stderr.replace("\n", "")
    assert _mode(harness.state_dir) == 0o777
    assert not (harness.state_dir / "ftsup.db").exists()  # no daemon was started
