"""The daemon's socket under abuse: bad frames, huge frames, strangers, no handshake."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from ftsup.supervisor.client import Client
from ftsup.supervisor.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    ProtocolError,
    RequestError,
    RequestType,
    decode_payload,
    encode_frame,
    hello,
    recv_frame_blocking,
)
from tests.supervisor_harness import Harness


def _raw(h: Harness) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(h.runtime_dir / "ftsup.sock"))
    return sock


def _closed(sock: socket.socket) -> bool:
    """True when the daemon closed the connection (after at most an error frame)."""
    try:
        while True:
            message = recv_frame_blocking(sock)
            if message is None:
                return True
            assert message.get("type") == "error"
    except (ConnectionResetError, ProtocolError):
        return True


def _still_serving(h: Harness) -> None:
    with Client(h.runtime_dir / "ftsup.sock") as client:
        assert client.request("ping")["pong"] is True


def test_socket_and_folder_are_private(daemon: Harness) -> None:
    assert (daemon.runtime_dir.stat().st_mode & 0o777) == 0o700
    assert ((daemon.runtime_dir / "ftsup.sock").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(struct.pack(">I", 5) + b"nope!", id="not-json"),
        pytest.param(struct.pack(">I", 2) + b"[]", id="json-not-object"),
        pytest.param(struct.pack(">I", 4) + b"\xff\xfe\x00\x01", id="not-utf8"),
        pytest.param(struct.pack(">I", MAX_FRAME + 1), id="oversized-header"),
        pytest.param(struct.pack(">I", 100) + b"{", id="truncated-then-eof"),
        pytest.param(encode_frame({"type": "status"}), id="request-before-hello"),
        pytest.param(encode_frame({"type": "hello", "version": 99}), id="wrong-version"),
    ],
)
def test_malformed_input_closes_only_that_connection(daemon: Harness, payload: bytes) -> None:
    bystander = Client(daemon.runtime_dir / "ftsup.sock")
    try:
        sock = _raw(daemon)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert _closed(sock)
        sock.close()
        assert bystander.request("ping")["pong"] is True  # an open connection is unharmed
        _still_serving(daemon)
    finally:
        bystander.close()


def test_malformed_frame_after_handshake_closes_connection(daemon: Harness) -> None:
    sock = _raw(daemon)
    sock.sendall(encode_frame(hello("test")))
    assert recv_frame_blocking(sock)["version"] == PROTOCOL_VERSION  # type: ignore[index]
    sock.sendall(struct.pack(">I", MAX_FRAME * 4) + b"x" * 1024)
    assert _closed(sock)
    _still_serving(daemon)


def test_unknown_request_type_and_bad_arguments_are_answered(daemon: Harness) -> None:
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        with pytest.raises(RequestError) as unknown:
            client.request("format_disk")
        assert unknown.value.code == "unknown_request"
        with pytest.raises(RequestError) as bad:
            client.request("stop", job=42)
        assert bad.value.code == "bad_request"
        with pytest.raises(RequestError) as missing:
            client.request("status", job="ghost")
        assert missing.value.code == "not_found"
        assert client.request("ping")["pong"] is True


@pytest.mark.parametrize(
    "kind", [k for k in RequestType if k not in (RequestType.SHUTDOWN, RequestType.SUBSCRIBE)]
)
def test_every_request_type_is_served(daemon: Harness, kind: RequestType) -> None:
    """Each protocol request reaches a handler: it may be refused for its arguments
    (a job that does not exist), never as unknown, never with an internal error."""
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        try:
            client.request(kind.value, job="ghost")
        except RequestError as exc:
            assert exc.code not in ("unknown_request", "internal"), (kind, exc.code, exc.message)


def test_subscribe_is_served_by_the_connection(daemon: Harness) -> None:
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        assert client.request(RequestType.SUBSCRIBE.value, kinds=["state"]) is not None


def test_peer_with_another_uid_is_refused(daemon: Harness) -> None:
    """Defence in depth: even if the folder's mode were loosened, SO_PEERCRED refuses."""
    assert os.geteuid() == 0, "needs root to connect as another uid (CI runs as root)"
    os.chmod(daemon.root, 0o755)
    os.chmod(daemon.runtime_dir, 0o755)
    os.chmod(daemon.runtime_dir / "ftsup.sock", 0o666)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, then connect
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                Client(daemon.runtime_dir / "ftsup.sock", name="stranger").close()
                code = "accepted"
            except RequestError as refused:
                code = refused.code
            os.write(write_end, code.encode())
        except BaseException as exc:  # report anything to the parent
            os.write(write_end, f"exception {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, _status = os.waitpid(pid, 0)
    answer = os.read(read_end, 1024).decode()
    os.close(read_end)
    assert answer == "forbidden"
    _still_serving(daemon)


def test_frame_codec_round_trip_and_cap() -> None:
    message = {"id": 1, "type": "status", "job": "x" * 100}
    frame = encode_frame(message)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode_payload(frame[4:]) == message
    with pytest.raises(ProtocolError):
        encode_frame({"blob": "x" * (MAX_FRAME + 1)})
    with pytest.raises(ProtocolError):
        decode_payload(b"[1, 2]")


def test_progress_history_returns_the_newest_lines(daemon: Harness) -> None:
    job = daemon.toy_job("historic", "--max-steps", "12")
    daemon.cli("start", str(job))
    daemon.wait_state("historic", "finished", "gave_up", "failed")
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        records = client.request("progress_history", job="historic", limit=5)["records"]
        assert len(records) == 5 and records[-1]["event"] == "train_end"
        steps = [r["step"] for r in records if r["event"] == "step"]
        assert steps == sorted(steps) and steps[-1] == 12
        with pytest.raises(RequestError):
            client.request("progress_history", job="nobody")
