"""Other-uid access: another user (uid 65534, by setuid in a child) tries to reach
what is ours, and pre-creates our runtime folder before our daemon or client.

Here "data lost" means a confidentiality loss: the other user drove our daemon,
read a state file, received the job spec (with its `[command] env` secret) from
our client, or made our daemon serve from a folder it controls; a secret printed
by `status` or `events` counts too. "Clear error" is a refusal (EACCES, a closed
connection, a client or daemon that exits 2/3/5 with a message).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

from bench.faults.daemon import Daemon, traceback_summaries
from bench.faults.outcomes import Case, Category, Config, Outcome, classify_cli
from bench.faults.procs import REAPER, wait_until
from bench.faults.toyrun import toy_job

NOBODY = 65534
SECRET = "hf_faultbenchSECRET0123456789"
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def _drop() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def as_nobody(code: str, timeout: float = 15) -> dict[str, object]:
    """Run Python `code` as uid 65534; it prints one JSON object."""
    res = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        preexec_fn=_drop,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"no result: {res.stdout[-300:]} {res.stderr[-300:]}"}


CONNECT = """
import json, socket, struct
def frame(m):
    p = json.dumps(m).encode(); return struct.pack(">I", len(p)) + p
def recv(s):
    h = s.recv(4)
    if len(h) < 4: return None
    n = struct.unpack(">I", h)[0]; d = b""
    while len(d) < n:
        c = s.recv(n - len(d))
        if not c: return None
        d += c
    return json.loads(d)
out = {}
try:
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(%r)
    s.sendall(frame({"type": "hello", "version": 1}))
    out["hello"] = recv(s)
    s.sendall(frame({"id": 1, "type": "list"}))
    out["list"] = recv(s)
except Exception as e:
    out["error"] = repr(e)
print(json.dumps(out))
"""

READ = """
import json
try:
    data = open(%r, "rb").read()
    print(json.dumps({"read": len(data), "secret": %r.encode() in data}))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"""

IMPOSTOR = """
import json, os, socket, struct
path, log = %r, %r
srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(8)
os.chmod(path, 0o777)
def frame(m):
    p = json.dumps(m).encode(); return struct.pack(">I", len(p)) + p
while True:
    c, _ = srv.accept(); c.settimeout(5)
    try:
        while True:
            h = c.recv(4)
            if len(h) < 4: break
            n = struct.unpack(">I", h)[0]; d = b""
            while len(d) < n:
                k = c.recv(n - len(d))
                if not k: break
                d += k
            with open(log, "ab") as f: f.write(d + b"\\n")
            m = json.loads(d)
            if m.get("type") == "hello":
                c.sendall(frame({"type": "hello", "version": 1, "daemon_pid": 1}))
            else:
                answer = {"name": "x", "state": "running"}
                c.sendall(frame({"id": m.get("id"), "ok": True, "result": answer}))
    except Exception:
        pass
    c.close()
"""


def judge_access(name: str, result: dict[str, object], what: str) -> Case:
    if "error" in result:
        return Case(name, Outcome.CLEAR, f"refused: {str(result['error'])[:200]}")
    secret = " (the secret with it)" if result.get("secret") else ""
    return Case(name, Outcome.LOST, f"uid {NOBODY} {what}{secret}: {str(result)[:200]}")


def own_files(config: Config, cat: Category) -> None:
    """Our daemon, a job with a secret, under umask 022; can uid 65534 get in?"""
    daemon = Daemon(config.root / "own")
    try:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        path, _ = toy_job(daemon.work, "secret", steps=5, step_time=0.01, env={"HF_TOKEN": SECRET})
        daemon.cli("start", str(path))
        daemon.wait_final("secret", 30)
        sock = daemon.runtime / "ftsup.sock"
        result = as_nobody(CONNECT % str(sock))
        hello = result.get("hello")
        if "error" in result or not isinstance(hello, dict) or hello.get("type") != "hello":
            cat.add(Case("connect to the socket", Outcome.CLEAR, f"refused: {str(result)[:200]}"))
        else:
            listed = result.get("list")
            cat.add(
                Case(
                    "connect to the socket",
                    Outcome.LOST,
                    f"uid {NOBODY} was served: {str(listed)[:200]}",
                )
            )
        run_dir = daemon.state / "runs" / "secret"
        for label, target in (
            ("read ftsup.db", daemon.state / "ftsup.db"),
            ("read ftsup.db-wal", daemon.state / "ftsup.db-wal"),
            ("read runs/<job>/job.toml", run_dir / "job.toml"),
            ("read attempt-1/stdout.log", run_dir / "attempt-1" / "stdout.log"),
            ("read progress.jsonl", run_dir / "progress.jsonl"),
        ):
            if target.exists():
                cat.add(judge_access(label, as_nobody(READ % (str(target), SECRET)), "read it"))
        for command in (("status", "secret", "--json"), ("events", "secret", "--json")):
            res = daemon.cli(*command)
            name = f"`ftsup {command[0]}` prints no secret"
            if SECRET in res.text:
                cat.add(
                    Case(
                        name,
                        Outcome.LOST,
                        f"`ftsup {' '.join(command)}` printed [command] env's HF_TOKEN",
                    )
                )
            else:
                cat.add(Case(name, *classify_cli(res)))
        health = daemon.health()
        if health:
            cat.add(Case("daemon after other-uid access", *health))
    finally:
        daemon.stop()


def impostor(config: Config, cat: Category) -> None:
    """Our runtime folder, pre-created and served by uid 65534: will our client talk?"""
    root = config.root / "imp"
    evil = root / "rt"
    evil.mkdir(parents=True)
    os.chown(evil, NOBODY, NOBODY)
    os.chmod(evil, 0o755)
    log = root / "heard"
    log.touch()
    os.chown(log, NOBODY, NOBODY)
    server = subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(IMPOSTOR % (str(evil / "ftsup.sock"), str(log)))],
        preexec_fn=_drop,
        start_new_session=True,
        cwd="/",
    )
    REAPER.pgids.add(server.pid)
    try:
        wait_until(lambda: (evil / "ftsup.sock").exists(), 10)
        daemon = Daemon(root, runtime=evil)
        path, _ = toy_job(daemon.work, "victim", steps=5, env={"HF_TOKEN": SECRET})
        res = daemon.cli("start", str(path), timeout=20)
        heard = log.read_text(errors="replace")
        name = "client with a runtime folder owned and served by another uid"
        if SECRET in heard or "spec_text" in heard:
            cat.add(
                Case(
                    name,
                    Outcome.LOST,
                    f"the impostor received the spec ({len(heard)} bytes, secret: "
                    f"{SECRET in heard}); client exit {res.rc}",
                )
            )
        else:
            outcome, detail = classify_cli(res)
            if outcome is Outcome.OK:
                outcome, detail = Outcome.LOST, f"the client believed the impostor: {detail}"
            cat.add(Case(name, outcome, detail))
    finally:
        server.kill()
        server.wait()


def foreign_folder(config: Config, cat: Category, which: str) -> None:
    """A daemon whose runtime (or state) folder already belongs to uid 65534 must refuse."""
    root = config.root / f"foreign-{which}"
    folder = root / ("r" if which == "runtime" else "s")
    folder.mkdir(parents=True)
    os.chown(folder, NOBODY, NOBODY)
    os.chmod(folder, 0o755)
    daemon = Daemon(root)
    name = f"daemon with a {which} folder owned by uid {NOBODY}"
    try:
        started = daemon.start(wait=10)
        time.sleep(0.3)
        log = daemon.new_log()
        mode = oct(folder.stat().st_mode & 0o777)
        owner = folder.stat().st_uid
        if started:
            cat.add(
                Case(
                    name,
                    Outcome.LOST,
                    f"the daemon serves from it (now owner {owner}, mode {mode})",
                )
            )
        elif "Traceback" in log:
            cat.add(Case(name, Outcome.CRASH, "; ".join(traceback_summaries(log)[:3])))
        elif log.strip():
            cat.add(Case(name, Outcome.CLEAR, log.strip()[-300:]))
        else:
            cat.add(Case(name, Outcome.CRASH, "the daemon did not start and said nothing"))
    finally:
        daemon.stop()


def run(config: Config, cat: Category) -> None:
    old = os.umask(0o022)  # a usual user's umask: ftsup must not rely on a strict one
    try:
        config.root.mkdir(parents=True, exist_ok=True)
        os.chmod(config.root, 0o755)
        own_files(config, cat)
        impostor(config, cat)
        foreign_folder(config, cat, "runtime")
        foreign_folder(config, cat, "state")
    finally:
        os.umask(old)
