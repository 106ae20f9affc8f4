"""Fuzzed frames: raw socket clients that break the framing, the handshake and the
arguments of requests, then random byte mutations of valid frames.

Per case: an `ok` answer is ok; an error answer with a code other than
`internal`, a handshake refusal, or a closed connection (the protocol closes a
connection on bad framing) is a clear error; an `internal` answer, no answer to a
complete frame, a traceback in the daemon's log, a dead daemon, or a fresh
`ftsup ls` that does not answer is a crash. A flood of connections that announce
8 MiB frames and send part of them must not grow the daemon without bound.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.faults.daemon import Daemon, category_daemon
from bench.faults.outcomes import Case, Category, Config, Outcome
from bench.faults.toyrun import toy_job

MAX_FRAME = 8 * 1024 * 1024
HELLO = {"type": "hello", "version": 1, "client": "fault-bench"}
Frames = list[bytes]


def frame(message: Any) -> bytes:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(payload)) + payload


@contextlib.contextmanager
def connect(path: Path, *, hello: bool = True, timeout: float = 5.0) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        if hello:
            sock.sendall(frame(HELLO))
            read_reply(sock)
        yield sock
    finally:
        sock.close()


def read_reply(sock: socket.socket) -> tuple[str, dict[str, Any] | None]:
    """("reply", message) | ("closed", None) | ("timeout", None) | ("garbage", None)."""
    try:
        header = _exactly(sock, 4)
        if header is None:
            return "closed", None
        payload = _exactly(sock, struct.unpack(">I", header)[0])
        if payload is None:
            return "closed", None
    except TimeoutError:
        return "timeout", None
    except OSError:
        return "closed", None
    try:
        message = json.loads(payload)
    except ValueError:
        return "garbage", None
    return "reply", message if isinstance(message, dict) else None


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return data


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def request(kind: str, **args: Any) -> bytes:
    return frame({"id": 1, "type": kind, **args})


# Requests whose arguments are wrong: an `ok` answer to one of them is a defect
# (`logs attempt=true` built `attempt-True`; a NUL in `spec_path` was taken).
MUST_REFUSE = {
    "request before hello",
    "hello version 2",
    "hello with version true",
    "events limit=10**30",
    "events limit=1.5",
    "logs attempt=true",
    "logs attempt=10**30",
    "logs attempt=-1",
    "start spec_path with NUL",
    "start spec_text with NUL",
    "start spec_text a number",
    "signal KILL\\0",
    "signal SIGFOO",
    "gpu_reset index=10**30",
    "subscribe jobs=str",
    "subscribe kinds=[1]",
}


def fixed_cases(job: str, work: Path) -> list[tuple[str, bool, Frames, bool]]:
    """(name, send hello first, frames, partial: silence is the right answer)."""
    valid = (work / "x.toml").as_posix()
    out = json.dumps(str(work / "n.out"))
    spec = f'[job]\nname = "n"\noutput_dir = {out}\n[command]\nargv = ["true"]\n'
    req = request
    return [
        ("bad JSON", True, [frame(b"{not json")], False),
        ("JSON array frame", True, [frame(b"[1,2]")], False),
        ("invalid UTF-8", True, [frame(b'{"id":1,"type":"\xff\xfe"}')], False),
        ("zero-length frame", True, [struct.pack(">I", 0)], False),
        ("header over the cap", True, [struct.pack(">I", 0xFFFFFFFF)], False),
        (
            "header at the cap, partial body",
            True,
            [struct.pack(">I", MAX_FRAME) + b"{" * 1000],
            True,
        ),
        ("partial header", True, [b"\x00\x00"], True),
        ("request before hello", False, [req("list")], False),
        ("hello version 2", False, [frame({"type": "hello", "version": 2})], False),
        ("hello with version true", False, [frame({"type": "hello", "version": True})], False),
        ("hello twice", True, [frame(HELLO)], False),
        ("deeply nested list", True, [frame(nested(100_000, "list"))], False),
        ("deeply nested object", True, [frame(nested(50_000, "dict"))], False),
        (
            "nested list in an argument",
            True,
            [frame(b'{"id":1,"type":"status","job":' + nested(100_000, "list") + b"}")],
            False,
        ),
        ("NaN literal", True, [frame(b'{"id":1,"type":"events","limit":NaN}')], False),
        ("1e999 literal", True, [frame(b'{"id":1,"type":"events","limit":1e999}')], False),
        ("unknown type", True, [req("nope")], False),
        ("type is a number", True, [frame({"id": 1, "type": 123})], False),
        ("no type", True, [frame({"id": 1})], False),
        ("id is 10**30", True, [frame({"id": 10**30, "type": "ping"})], False),
        ("id is a list", True, [frame({"id": [1], "type": "ping"})], False),
        ("events limit=10**30", True, [req("events", limit=10**30)], False),
        ("events limit=-1", True, [req("events", limit=-1)], False),
        ("events after_id=-10**30", True, [req("events", after_id=-(10**30))], False),
        ("events limit=1.5", True, [req("events", limit=1.5)], False),
        ("events job=NUL", True, [req("events", job="a\u0000b")], False),
        ("logs attempt=true", True, [req("logs", job=job, attempt=True)], False),
        ("logs attempt=10**30", True, [req("logs", job=job, attempt=10**30)], False),
        ("logs attempt=-1", True, [req("logs", job=job, attempt=-1)], False),
        ("logs lines=10**30", True, [req("logs", job=job, lines=10**30)], False),
        ("logs lines=-5", True, [req("logs", job=job, lines=-5)], False),
        ("status job=NUL", True, [req("status", job="a\u0000b")], False),
        ("status job=list", True, [req("status", job=["a"])], False),
        ("status job=../..", True, [req("status", job="../..")], False),
        ("checkpoints job=../..", True, [req("checkpoints", job="../..")], False),
        (
            "progress_history limit=10**30",
            True,
            [req("progress_history", job=job, limit=10**30)],
            False,
        ),
        (
            "start spec_path with NUL",
            True,
            [req("start", spec_path=valid + "\u0000x", spec_text=spec)],
            False,
        ),
        (
            "start spec_text with NUL",
            True,
            [req("start", spec_path=valid, spec_text=spec + "\u0000")],
            False,
        ),
        (
            "start spec_path relative",
            True,
            [req("start", spec_path="rel.toml", spec_text="[job]\n")],
            False,
        ),
        (
            "start spec_text 7 MiB",
            True,
            [req("start", spec_path=valid, spec_text="#" * (7 << 20))],
            False,
        ),
        ("start spec_text a number", True, [req("start", spec_path=valid, spec_text=5)], False),
        ("signal KILL\\0", True, [req("signal", job=job, signal="KILL\u0000")], False),
        ("signal 9", True, [req("signal", job=job, signal=9)], False),
        ("signal SIGFOO", True, [req("signal", job=job, signal="SIGFOO")], False),
        ("stop now=yes", True, [req("stop", job=job, now="yes")], False),
        ("gpu_reset index=10**30", True, [req("gpu_reset", index=10**30)], False),
        ("subscribe jobs=str", True, [req("subscribe", jobs="x")], False),
        ("subscribe kinds=[1]", True, [req("subscribe", kinds=[1, 2])], False),
        ("subscribe 100k jobs", True, [req("subscribe", jobs=["a"] * 100_000)], False),
    ]


def fuzzed(rng: random.Random, job: str) -> tuple[str, Frames]:
    """A valid request frame with random flips, cuts, insertions or a lying header."""
    kinds = ["status", "events", "logs", "list", "progress_history", "checkpoints"]
    data = bytearray(request(rng.choice(kinds), job=job, limit=rng.randrange(1, 50)))
    how = rng.choice(["flip", "cut", "insert", "header"])
    if how == "flip":
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(4, len(data))] = rng.randrange(256)
    elif how == "cut":
        data = data[:4] + data[4 : rng.randrange(5, len(data))]
        data[:4] = struct.pack(">I", len(data) - 4)
    elif how == "insert":
        at = rng.randrange(4, len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        data[:4] = struct.pack(">I", len(data) - 4)
    else:
        data[:4] = struct.pack(">I", max(1, len(data) - 4 - rng.randrange(1, 10)))
    return f"fuzz {how}", [bytes(data)]


def judge(
    daemon: Daemon, name: str, hello: bool, frames: Frames, partial: bool, must_refuse: bool
) -> Case:
    try:
        with connect(
            daemon.runtime / "ftsup.sock", hello=hello, timeout=2 if partial else 5
        ) as sock:
            for data in frames:
                with contextlib.suppress(OSError):
                    sock.sendall(data)
            kind, message = read_reply(sock)
    except OSError as exc:
        return Case(name, Outcome.CRASH, f"could not connect: {exc}")
    if kind == "reply" and message is not None:
        error = message.get("error") if isinstance(message.get("error"), dict) else None
        if message.get("ok") or message.get("type") == "hello":
            outcome, detail = Outcome.OK, "answered ok"
            if must_refuse:
                result = str(message.get("result", message))[:200]
                outcome, detail = Outcome.CRASH, f"accepted a bad request: {result}"
        elif error and error.get("code") == "internal":
            outcome, detail = Outcome.CRASH, f"internal error: {error.get('message')}"
        elif error:
            outcome, detail = (
                Outcome.CLEAR,
                f"{error.get('code')}: {str(error.get('message'))[:200]}",
            )
        else:
            outcome, detail = Outcome.CRASH, f"unexpected answer {str(message)[:200]}"
    elif kind == "closed":
        outcome, detail = Outcome.CLEAR, "connection closed"
    elif kind == "timeout" and partial:
        outcome, detail = Outcome.OK, "waits for the rest of the frame"
    else:
        outcome, detail = Outcome.CRASH, f"no answer ({kind}) to a complete frame"
    health = daemon.health()
    if health:
        outcome, detail = health[0], f"{health[1]} (after: {detail})"
    return Case(name, outcome, detail)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


FLOOD_SENT = 6 * 1024 * 1024  # of each announced 8 MiB frame
FLOOD_LIMIT_MIB = 100  # growth allowed: unfinished frames are capped (64 MiB) + slack


def partial_flood(daemon: Daemon, connections: int) -> Case:
    """Connections that announce 8 MiB frames and send 6 MiB of each: the daemon's
    memory must stay bounded (it took 40 connections from 40 to 361 MiB)."""
    assert daemon.proc is not None
    before = rss_mib(daemon.proc.pid)
    socks = []
    refused = 0
    try:
        for _ in range(connections):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            socks.append(sock)
            try:
                sock.connect(str(daemon.runtime / "ftsup.sock"))
                sock.sendall(frame(HELLO))
                read_reply(sock)
                sock.sendall(struct.pack(">I", MAX_FRAME) + b" " * FLOOD_SENT)
            except OSError:
                refused += 1  # back-pressure or a refusal: bounded either way
        time.sleep(1.0)
        grown = rss_mib(daemon.proc.pid) - before
    finally:
        for sock in socks:
            sock.close()
    name = f"{connections} connections each announcing 8 MiB, sending 6 MiB"
    detail = f"daemon RSS +{grown:.0f} MiB, {refused} sends refused or blocked"
    outcome = Outcome.CRASH if grown > FLOOD_LIMIT_MIB else Outcome.OK
    if outcome is Outcome.CRASH:
        detail = "unbounded buffering: " + detail
    health = daemon.health()
    if health:
        outcome, detail = health[0], f"{health[1]} (after: {detail})"
    return Case(name, outcome, detail)


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    with category_daemon(config.root) as daemon:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        path, _ = toy_job(daemon.work, "f", steps=10, step_time=0.01)
        daemon.cli("start", str(path))
        daemon.wait_final("f", 30)
        daemon.new_log()
        cases = fixed_cases("f", daemon.work)
        if config.quick:  # the defects of the issue, and a sample of the rest
            keep = {"deeply nested list", "events limit=10**30", "logs attempt=true"}
            keep |= {"start spec_path with NUL", "header over the cap", "bad JSON"}
            rest = [c for c in cases if c[0] not in keep]
            cases = [c for c in cases if c[0] in keep] + rng.sample(rest, 6)
        for name, hello, frames, partial in cases:
            cat.add(judge(daemon, name, hello, frames, partial, name in MUST_REFUSE))
        for _ in range(8 if config.quick else 150):
            name, frames = fuzzed(rng, "f")
            cat.add(judge(daemon, name, True, frames, name == "fuzz header", False))
        cat.add(partial_flood(daemon, 20 if config.quick else 40))
