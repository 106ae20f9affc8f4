"""The socket cannot be exhausted or confused (issue 12, defect 2 and the smaller ones).

Clients can neither use up the daemon's descriptors (a connection cap, and a
soft open-file limit raised to the hard one) nor its memory (the bytes of
unfinished frames are capped across all connections); odd frames and
arguments get a clear answer, never an internal error or a traceback; and a
daemon that accepts but never answers is reported as no daemon.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.client import Client
from ftsup.supervisor.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    ProtocolError,
    RequestError,
    decode_payload,
    encode_frame,
    hello,
    recv_frame_blocking,
)
from tests.supervisor_harness import Harness, wait_for

MiB = 1024 * 1024


def _start_daemon(h: Harness, nofile: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    """`harness.start_daemon`, optionally under an open-file limit (as `prlimit --nofile`)."""
    preexec: Callable[[], None] | None = None
    if nofile is not None:
        limits = nofile

        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    h.state_dir.mkdir(parents=True, exist_ok=True)
    with (h.state_dir / "daemon-test.log").open("ab") as log:
        h.daemon = subprocess.Popen(
            [sys.executable, "-m", "ftsup.supervisor", "daemon"],
            env=h.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=preexec,
        )
    wait_for(lambda: h.cli("ls", check=False).returncode == 0, 30, 0.1, "the daemon")
    return h.daemon


def _raw(h: Harness) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(h.runtime_dir / "ftsup.sock"))
    return sock


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This test process opens hundreds of sockets: its own soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_daemon_raises_its_soft_open_file_limit(harness: Harness) -> None:
    daemon = _start_daemon(harness, nofile=(256, 4096))
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line

    # ...but the trainer runs under its user's limits, as it would without ftsup.
    harness.cli("start", str(harness.toy_job("limited", "--max-steps", "100000")))
    harness.wait_state("limited", "running")
    trainer = wait_for(
        lambda: next((p.get("trainer_pid") for p in harness.attempt_pids("limited")), None),
        30,
        what="the trainer's pid",
    )
    limits = Path(f"/proc/{trainer}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["256", "4096"], line
    assert b"FTSUP_USER_NOFILE" not in Path(f"/proc/{trainer}/environ").read_bytes()
    harness.cli("stop", "--now", "limited")


def test_a_flood_of_idle_connections_is_refused_cleanly(
    harness: Harness, many_descriptors: None
) -> None:
    """Under `--nofile=256`, 300 idle connections after `hello`: those over the cap get
    a `busy` frame at once (none is left hanging), the daemon keeps descriptors for
    its job, and answers again as soon as they close."""
    _start_daemon(harness, nofile=(256, 256))
    job = harness.toy_job("steady", "--max-steps", "60", "--step-time", "0.02")
    harness.cli("start", str(job))
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(sock)
            _connect_patiently(sock, harness.runtime_dir / "ftsup.sock")
        answers = _first_frames(flood, timeout=120)
        unanswered = [i for i, a in enumerate(answers) if a is None]
        assert not unanswered, f"{len(unanswered)} connections got no answer at all"
        kinds = {_kind(a) for a in answers if a is not None}
        assert kinds == {"hello", "busy"}, kinds
        refused = harness.cli("ls", check=False)
        assert refused.returncode == 5 and "connections" in refused.stderr, refused
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: harness.cli("ls", check=False).returncode == 0, 60, 0.2, "ls after the flood")
    assert harness.wait_state("steady", "finished", "failed", "gave_up")["state"] == "finished"
    assert not list((harness.work / "steady").glob("*.invalid-*"))


def _connect_patiently(sock: socket.socket, path: Path, timeout: float = 60) -> None:
    """connect(), waiting while the listen backlog is full (EAGAIN on a Unix socket);
    a daemon out of descriptors never accepts again, and this fails."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError("the daemon stopped accepting connections") from None
            time.sleep(0.01)


def _kind(frame: dict[str, Any]) -> str:
    if frame.get("type") == "hello":
        return "hello"
    return str(frame.get("error", {}).get("code"))


def _first_frames(socks: list[socket.socket], timeout: float) -> list[dict[str, Any] | None]:
    """Send `hello` on each connection, then the first frame each one gets back."""
    pending = {sock.fileno(): i for i, sock in enumerate(socks)}
    frames: list[dict[str, Any] | None] = [None] * len(socks)
    buffers = {i: b"" for i in range(len(socks))}
    for sock in socks:
        with contextlib.suppress(OSError):  # a refused one may be closed already
            sock.sendall(encode_frame(hello("flood")))
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = timeout * 1000
    while pending and deadline > 0:
        events = poller.poll(1000)
        deadline -= 1000 if not events else 0
        for fd, _ in events:
            i = pending[fd]
            try:
                chunk = socks[i].recv(65536)
            except OSError:
                chunk = b""
            buffers[i] += chunk
            data = buffers[i]
            if len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
                frames[i] = decode_payload(data[4 : 4 + struct.unpack(">I", data[:4])[0]])
            if frames[i] is not None or not chunk:
                poller.unregister(fd)
                del pending[fd]
    return frames


def test_partial_frames_do_not_grow_the_daemon(daemon: Harness) -> None:
    """40 connections announce 8 MiB frames and send 7 MiB of each, then wait: the
    daemon holds at most its budget of unfinished frames, not 280 MiB."""
    assert daemon.daemon is not None
    pid = daemon.daemon.pid
    baseline = _rss_bytes(pid)
    conns = []
    for _ in range(40):
        sock = _raw(daemon)
        sock.sendall(encode_frame(hello("partial")))
        assert recv_frame_blocking(sock)["version"] == PROTOCOL_VERSION  # type: ignore[index]
        sock.sendall(struct.pack(">I", MAX_FRAME))
        conns.append(sock)
    try:
        _send_round_robin(conns, 7 * MiB)
        growth = _rss_bytes(pid) - baseline
        assert growth < 128 * MiB, f"the daemon grew by {growth // MiB} MiB"
        assert daemon.cli("ls", check=False).returncode == 0  # small frames still served
    finally:
        for sock in conns:
            sock.close()
    wait_for(lambda: daemon.cli("ls", check=False).returncode == 0, 60, 0.2, "the daemon")


def _send_round_robin(conns: list[socket.socket], size: int) -> None:
    """`size` bytes on each connection, interleaved, until sent or refused by the peer."""
    piece = b"x" * (256 * 1024)
    left = {sock.fileno(): size for sock in conns}
    by_fd = {sock.fileno(): sock for sock in conns}
    for sock in conns:
        sock.setblocking(False)
    while left:
        _, writable, _ = select.select([], list(left), [], 60)
        assert writable, "the daemon stopped reading without refusing"
        for fd in writable:
            try:
                sent = by_fd[fd].send(piece[: min(len(piece), left[fd])])
            except BlockingIOError:
                continue
            except OSError:  # refused: the daemon closed it (busy)
                del left[fd]
                continue
            left[fd] -= sent
            if left[fd] <= 0:
                del left[fd]


def test_deeply_nested_frame_is_a_protocol_error(daemon: Harness) -> None:
    sock = _raw(daemon)
    sock.sendall(encode_frame(hello("nested")))
    recv_frame_blocking(sock)
    depth = 100_000
    payload = b'{"id":1,"type":"ping","x":' + b"[" * depth + b"]" * depth + b"}"
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    reply = recv_frame_blocking(sock)
    assert reply is not None and reply["error"]["code"] == "protocol", reply
    sock.close()
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        assert client.request("ping")["pong"] is True
    assert "RecursionError" not in daemon.daemon_log()


def test_odd_arguments_are_bad_requests(daemon: Harness) -> None:
    job = daemon.toy_job("plain", "--max-steps", "3")
    daemon.cli("start", str(job))
    daemon.wait_state("plain", "finished")
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("events", {"limit": 10**30}),
            ("events", {"after_id": -(10**30)}),
            ("logs", {"job": "plain", "attempt": True}),
            ("logs", {"job": "plain", "lines": 10**30}),
            ("start", {"spec_path": "/tmp/a\0b.toml", "spec_text": job.read_text()}),
            ("status", {"job": "pl\0ain"}),
        ]
        for kind, args in cases:
            with pytest.raises(RequestError) as refused:
                client.request(kind, **args)
            assert refused.value.code == "bad_request", (kind, args, refused.value.message)
        assert client.request("ping")["pong"] is True
    assert "Traceback" not in daemon.daemon_log()


def test_finished_jobs_keep_their_numbers_across_a_daemon_restart(harness: Harness) -> None:
    harness.start_daemon()
    job = harness.toy_job("bumpy", "--max-steps", "12", "--crash-at", "6")
    harness.cli("start", str(job))
    before = harness.wait_state("bumpy", "finished", timeout=120)
    assert before["restarts"] >= 1 and before["progress"]["step"] == 12
    harness.kill_daemon()
    harness.start_daemon()
    after = harness.status("bumpy")
    assert after["restarts"] == before["restarts"]
    assert after["progress"] is not None and after["progress"]["step"] == 12
    listed = next(j for j in harness.cli_json("ls")["jobs"] if j["name"] == "bumpy")
    assert listed["restarts"] == before["restarts"] and listed["progress"]["step"] == 12


def test_shutdown_logs_no_traceback(daemon: Harness) -> None:
    """`ftsup shutdown` with idle clients and one that asks and never reads its replies
    (its connection cannot be closed politely): the daemon exits 0, and logs no
    CancelledError traceback."""
    assert daemon.daemon is not None
    idle = [_raw(daemon) for _ in range(5)]
    for sock in idle:
        sock.sendall(encode_frame(hello("idle")))
        recv_frame_blocking(sock)
    stalled = idle[0]
    stalled.setblocking(False)
    ping = encode_frame({"id": 1, "type": "ping"})
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < 4 * MiB:  # until the daemon stops reading: its replies fill up
            sent += stalled.send(ping * 256)
    try:
        daemon.cli("shutdown")
        assert daemon.daemon.wait(60) == 0
    finally:
        for sock in idle:
            sock.close()
    daemon.daemon = None
    log = daemon.daemon_log()
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_frozen_daemon_is_no_daemon(harness: Harness) -> None:
    """A socket whose server accepts and never answers: exit 3 and a message, not a
    TimeoutError traceback."""
    harness.runtime_dir.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(harness.runtime_dir / "ftsup.sock"))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        harness.env["FTSUP_CLIENT_TIMEOUT"] = "2"
        result = harness.cli("ls", check=False, timeout=120)
    finally:
        stop.set()
        thread.join(10)
        for sock in held:
            sock.close()
        server.close()
    assert result.returncode == 3, result
    assert "Traceback" not in result.stderr
    assert "did not answer" in result.stderr.replace("\n", " ")


def test_nesting_decodes_to_a_protocol_error_not_a_recursion_error() -> None:
    with pytest.raises(ProtocolError):
        decode_payload(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ProtocolError):
        decode_payload(b'{"x":' + b"[" * 100 + b"]" * 100 + b"}")  # parses, but too deep


def test_a_bool_is_not_a_protocol_version(daemon: Harness) -> None:
    """`True == 1` in Python: a hello with `"version": true` was taken for version 1."""
    sock = _raw(daemon)
    sock.sendall(encode_frame({"type": "hello", "version": True, "client": "odd"}))
    reply = recv_frame_blocking(sock)
    assert reply is not None and reply.get("type") == "error", reply
    assert reply["error"]["code"] == "protocol"
    sock.close()


@pytest.mark.parametrize("args", [{"jobs": "x"}, {"kinds": [1, 2]}, {"jobs": {"a": 1}}])
def test_a_malformed_subscription_is_a_bad_request(daemon: Harness, args: dict[str, Any]) -> None:
    sock = _raw(daemon)
    sock.sendall(encode_frame(hello("sub")))
    recv_frame_blocking(sock)
    sock.sendall(encode_frame({"id": 1, "type": "subscribe", **args}))
    reply = recv_frame_blocking(sock)
    assert reply is not None and reply["ok"] is False, reply
    assert reply["error"]["code"] == "bad_request"
    sock.sendall(encode_frame({"id": 2, "type": "ping"}))  # the connection still serves
    pong = recv_frame_blocking(sock)
    assert pong is not None and pong["ok"] is True
    sock.close()
