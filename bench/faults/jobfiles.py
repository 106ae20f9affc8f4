"""Bad job files: mutated `job.toml` files through `ftsup check` and `ftsup start`.

Value mutations (unknown keys, wrong types, out-of-range numbers, NUL bytes, huge
strings, broken TOML) must be refused by both commands with exit 2 and a message.
Path mutations (the output folder is a file, a symlink loop, read-only, a FIFO,
an alias of a running job's folder; a FIFO or a symlink at `.ftsup.lock`; a FIFO
as a checkpoint's `trainer_state.json`) must be refused at submit or run to a
truthful end, never hang the daemon, never end in "internal error"/"shim died",
never overwrite a file outside the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults.daemon import LIVE_STATES, Daemon, category_daemon
from bench.faults.outcomes import Case, Category, Config, Outcome, classify_cli
from bench.faults.procs import wait_until
from bench.faults.toyrun import TOY_TRAINER, toy_job

Sections = dict[str, dict[str, str]]  # section -> key -> TOML literal


@dataclass
class Mutant:
    name: str
    must_refuse: bool
    sections: Sections | None = None
    raw: bytes | None = None  # the file's bytes, when not rendered from sections
    fifos: list[Path] = field(default_factory=list)  # to unblock a daemon stuck on one
    victim: Path | None = None  # a file outside the job that must keep its bytes
    cleanup: Callable[[], None] | None = None


def base_sections(work: Path, job: str) -> Sections:
    out = work / f"{job}.out"
    argv = [sys.executable, str(TOY_TRAINER), "--output-dir", str(out)]
    argv += ["--max-steps", "10", "--save-steps", "5", "--step-time", "0.02"]
    return {
        "job": {"name": json.dumps(job), "output_dir": json.dumps(str(out))},
        "command": {
            "argv": json.dumps(argv),
            "resume_args": '["--resume_from_checkpoint", "{checkpoint}"]',
        },
        "restart": {"backoff": '"0.1s"', "max_restarts": "2", "crash_loop": "2"},
    }


def render(sections: Sections) -> bytes:
    text = ""
    for section, keys in sections.items():
        text += f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
    return text.encode()


# ---------------------------------------------------------------- value mutations

WRONG_TYPES = [
    ("job", "name", "1"),
    ("job", "output_dir", "[]"),
    ("command", "argv", "1"),
    ("command", "argv", "[1, 2]"),
    ("command", "argv", "[]"),
    ("command", "env", '["A"]'),
    ("command", "env", "{ A = 1 }"),
    ("command", "resume_args", "3"),
    ("command", "cwd", "5"),
    ("restart", "max_restarts", '"3"'),
    ("restart", "backoff", "[1]"),
    ("restart", "crash_loop", "true"),
    ("restart", "standby", '"yes"'),
    ("restart", "stop_grace", "{ a = 1 }"),
]
OUT_OF_RANGE = [
    ("restart", "max_restarts", "-1"),
    ("restart", "crash_loop", "0"),
    ("restart", "backoff", "1e300"),
    ("restart", "backoff", '"1e300s"'),
    ("restart", "backoff", '"-5s"'),
    ("restart", "backoff", "inf"),
    ("restart", "backoff", "nan"),
    ("restart", "backoff_max", "1e300"),
    ("restart", "stop_grace", "1e300"),
    ("restart", "stop_grace", '"99999999999999999999999d"'),
    ("restart", "max_restarts", "9223372036854775807"),
    ("restart", "crash_loop", "99999999999999999999999999999"),
    ("health", "hang_timeout", '"1e300s"'),
    ("health", "startup_timeout", "-1"),
    ("checkpoint", "keep_last", "0"),
    ("checkpoint", "min_free", '"-1GB"'),
]


def value_mutants(rng: random.Random, work: Path, job: str) -> list[Callable[[], Mutant]]:
    """Every value mutation kind, each a factory (seeded choices inside)."""

    def base() -> Sections:
        return base_sections(work, job)

    def unknown_key() -> Mutant:
        s = base()
        section = rng.choice(list(s))
        s[section][f"unknwon_{rng.randrange(1000)}"] = "1"
        return Mutant(f"unknown key in [{section}]", True, s)

    def unknown_section() -> Mutant:
        s = base()
        s[f"bogus{rng.randrange(100)}"] = {"a": "1"}
        return Mutant("unknown section", True, s)

    def wrong_type() -> Mutant:
        section, key, literal = rng.choice(WRONG_TYPES)
        s = base()
        s.setdefault(section, {})[key] = literal
        return Mutant(f"wrong type {section}.{key} = {literal}", True, s)

    def out_of_range() -> Mutant:
        section, key, literal = rng.choice(OUT_OF_RANGE)
        s = base()
        s.setdefault(section, {})[key] = literal
        return Mutant(f"out of range {section}.{key} = {literal[:30]}", True, s)

    def nul_in_string() -> Mutant:
        s = base()
        where = rng.choice(["name", "output_dir", "argv", "env", "cwd"])
        if where == "name":
            s["job"]["name"] = json.dumps(f"{job}\u0000x")
        elif where == "output_dir":
            s["job"]["output_dir"] = json.dumps(str(work / f"{job}\u0000.out"))
        elif where == "argv":
            s["command"]["argv"] = json.dumps([sys.executable, "-c", "print(1)\u0000"])
        elif where == "env":
            s["command"]["env"] = '{ A = "x\\u0000y" }'
        else:
            s["command"]["cwd"] = json.dumps(f"{work}\u0000")
        return Mutant(f"NUL in {where}", True, s)

    def raw_nul() -> Mutant:
        text = render(base())
        at = rng.randrange(len(text))
        return Mutant("raw NUL byte in the file", True, raw=text[:at] + b"\0" + text[at:])

    def huge_string() -> Mutant:
        s = base()
        where = rng.choice(["name", "output_dir", "argv", "env"])
        if where == "name":
            s["job"]["name"] = json.dumps("n" * 1_000_000)
        elif where == "output_dir":
            s["job"]["output_dir"] = json.dumps(str(work / ("d" * 5000)))
        elif where == "argv":
            s["command"]["argv"] = json.dumps([sys.executable] + ["-v"] * 200_000)
        else:
            s["command"]["env"] = "{ BIG = " + json.dumps("v" * 2_000_000) + " }"
        # argv and env of that size may be valid TOML and valid values: the exec may
        # fail later (E2BIG), which must then be a truthful failure, not a hang.
        return Mutant(f"huge string in {where}", where in ("name", "output_dir"), s)

    def broken_toml() -> Mutant:
        text = render(base())
        kind = rng.choice(["empty", "truncated", "utf8", "duplicate", "garbage", "no job"])
        if kind == "empty":
            raw = b""
        elif kind == "truncated":
            raw = text[: rng.randrange(1, len(text) - 1)]
        elif kind == "utf8":
            raw = text.replace(b'name = "', b'name = "\xff\xfe', 1)
        elif kind == "duplicate":
            raw = text.replace(b"[restart]\n", b'[restart]\nbackoff = "1s"\n', 1)
        elif kind == "garbage":
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(10, 4000)))
        else:
            raw = b"[command]" + text.split(b"[command]")[1]
        return Mutant(f"broken TOML ({kind})", True, raw=raw)

    return [
        unknown_key,
        unknown_section,
        wrong_type,
        out_of_range,
        nul_in_string,
        raw_nul,
        huge_string,
        broken_toml,
    ]


# ----------------------------------------------------------------- path mutations


def path_mutants(work: Path, job: str, live_out: Path) -> list[Callable[[], Mutant]]:
    """Hostile output folders. `live_out` is the output folder of a running job."""
    here = work / f"{job}.paths"

    def with_out(name: str, out: Path, must_refuse: bool, **kw: object) -> Mutant:
        s = base_sections(work, job)
        s["job"]["output_dir"] = json.dumps(str(out))
        s["command"]["argv"] = s["command"]["argv"].replace(
            json.dumps(str(work / f"{job}.out")), json.dumps(str(out))
        )
        return Mutant(name, must_refuse, s, **kw)  # type: ignore[arg-type]

    def out_is_file() -> Mutant:
        here.mkdir(parents=True, exist_ok=True)
        (here / "afile").write_text("x")
        return with_out("output_dir is a file", here / "afile", True)

    def under_file() -> Mutant:
        here.mkdir(parents=True, exist_ok=True)
        (here / "bfile").write_text("x")
        return with_out("output_dir under a file", here / "bfile" / "sub", True)

    def symlink_loop() -> Mutant:
        here.mkdir(parents=True, exist_ok=True)
        os.symlink(here / "loop-b", here / "loop-a")
        os.symlink(here / "loop-a", here / "loop-b")
        return with_out("output_dir is a symlink loop", here / "loop-a", True)

    def read_only() -> Mutant:
        ro = here / "ro"
        ro.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)

        def umount() -> None:
            subprocess.run(["umount", "-l", str(ro)], check=False)

        return with_out("output_dir on a read-only mount", ro / "out", True, cleanup=umount)

    def out_is_fifo() -> Mutant:
        here.mkdir(parents=True, exist_ok=True)
        os.mkfifo(here / "ofifo")
        return with_out("output_dir is a FIFO", here / "ofifo", True, fifos=[here / "ofifo"])

    def dev_null() -> Mutant:
        return with_out("output_dir is /dev/null", Path("/dev/null"), True)

    def fifo_lock() -> Mutant:
        out = here / "fifolock"
        out.mkdir(parents=True, exist_ok=True)
        os.mkfifo(out / ".ftsup.lock")
        return with_out("FIFO at .ftsup.lock", out, False, fifos=[out / ".ftsup.lock"])

    def symlink_lock() -> Mutant:
        out = here / "linklock"
        out.mkdir(parents=True, exist_ok=True)
        victim = here / "victim.txt"
        victim.write_text("precious bytes\n")
        os.symlink(victim, out / ".ftsup.lock")
        return with_out("symlink at .ftsup.lock", out, False, victim=victim)

    def fifo_trainer_state() -> Mutant:
        out = here / "fifostate"
        (out / "checkpoint-5").mkdir(parents=True, exist_ok=True)
        os.mkfifo(out / "checkpoint-5" / "trainer_state.json")
        fifo = out / "checkpoint-5" / "trainer_state.json"
        return with_out("FIFO as checkpoint-5/trainer_state.json", out, False, fifos=[fifo])

    def alias_of_live() -> Mutant:
        here.mkdir(parents=True, exist_ok=True)
        alias = here / "alias"
        os.symlink(live_out, alias)
        return with_out("symlink alias of a running job's output_dir", alias, True)

    def missing_program() -> Mutant:
        s = base_sections(work, job)
        s["command"]["argv"] = json.dumps([str(here / "no-such-program"), "--x"])
        return Mutant("argv[0] does not exist", False, s)

    return [
        out_is_file,
        under_file,
        symlink_loop,
        read_only,
        out_is_fifo,
        dev_null,
        fifo_lock,
        symlink_lock,
        fifo_trainer_state,
        alias_of_live,
        missing_program,
    ]


# --------------------------------------------------------------------- judging


def unblock(fifos: list[Path]) -> None:
    """Give a reader stuck in open() on a FIFO its writer, so a hung daemon moves on."""
    for fifo in fifos:
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))


def judge(daemon: Daemon, path: Path, mutant: Mutant, job: str, command: str) -> Case:
    name = f"{command}: {mutant.name}"
    victim = mutant.victim.read_bytes() if mutant.victim else None
    res = daemon.cli(command, str(path), timeout=10)
    unblock(mutant.fifos)
    outcome, detail = classify_cli(res)
    if outcome is Outcome.OK and mutant.must_refuse:
        outcome, detail = Outcome.CRASH, f"accepted a file that must be refused: {detail}"
    if command == "start":
        if outcome is Outcome.OK:
            outcome, detail = judge_started(daemon, job, outcome, detail)
            unblock(mutant.fifos)
        health = daemon.health()
        if health and outcome is not Outcome.LOST:
            outcome, detail = health[0], f"{health[1]} (after: {detail})"
    if mutant.victim is not None and mutant.victim.read_bytes() != victim:
        outcome, detail = Outcome.LOST, f"{mutant.victim} was overwritten through the lock symlink"
    return Case(name, outcome, detail)


def judge_started(daemon: Daemon, job: str, outcome: Outcome, detail: str) -> tuple[Outcome, str]:
    """An accepted job must end truthfully: not 'internal error', not 'shim died'."""
    final = daemon.wait_final(job, 15)
    if final is None:
        now = daemon.status(job)
        daemon.cli("stop", job, "--now", timeout=10)
        if now is None:
            return Outcome.CRASH, "accepted, then no status answered (hang?)"
        return outcome, f"accepted, still {now.get('state')} after 15s"
    reason = str(final.get("reason"))
    if "internal" in reason or "shim died" in reason:
        return Outcome.CRASH, f"accepted, then {final.get('state')}: {reason}"
    return outcome, f"accepted, ended {final.get('state')}: {reason[:200]}"


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    with category_daemon(config.root) as daemon:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        # A running job whose output folder the alias case points at.
        live_path, live_out = toy_job(daemon.work, "live", steps=100000, step_time=0.1)
        daemon.cli("start", str(live_path))
        wait_until(lambda: (live_out / "steps.log").exists(), 15)
        setup = daemon.health()
        live = daemon.status("live") or {}
        if setup or live.get("state") != "running":
            detail = setup[1] if setup else f"{live.get('state')}: {live.get('reason')}"
            cat.add(Case("setup: a running job", Outcome.CRASH, detail))
        n_values = 8 if config.quick else 120
        names = [f.__name__ for f in value_mutants(rng, daemon.work, "x")]
        plans = [("value", names[i % len(names)]) for i in range(n_values)]
        paths = [f.__name__ for f in path_mutants(daemon.work, "x", live_out)]
        if config.quick:  # the defects of the issue
            paths = ["out_is_file", "fifo_lock", "symlink_lock", "fifo_trainer_state"]
            paths += ["alias_of_live"]
        plans += [("path", name) for name in paths]
        for index, (kind, factory_name) in enumerate(plans, 1):
            job = f"bf{index}"
            factories = (
                value_mutants(rng, daemon.work, job)
                if kind == "value"
                else path_mutants(daemon.work / f"p{index}", job, live_out)
            )
            factory = next(f for f in factories if f.__name__ == factory_name)
            mutant = factory()
            path = daemon.work / f"{job}.toml"
            path.write_bytes(
                mutant.raw if mutant.raw is not None else render(mutant.sections or {})
            )
            try:
                # Path mutants are about the run, not the file: `check` may accept them.
                if kind == "value" or not config.quick:
                    check_mutant = Mutant(mutant.name, mutant.must_refuse and kind == "value")
                    cat.add(judge(daemon, path, check_mutant, job, "check"))
                if kind == "value" and config.quick and index % 4:
                    continue  # quick: every fourth value mutant is also submitted
                cat.add(judge(daemon, path, mutant, job, "start"))
                status = daemon.status(job)
                if status is not None and status.get("state") in LIVE_STATES:
                    daemon.cli("stop", job, "--now", timeout=10)
            finally:
                if mutant.cleanup is not None:
                    mutant.cleanup()
