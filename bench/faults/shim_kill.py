"""Shim SIGKILLs: the shim between the daemon and a trainer is SIGKILLed at random
moments; every run must be resumed (or go on) and end finished with the exact
result, one trainer at a time. Then a graceful `ftsup stop` after the shim died
must still stop the trainer (not let it train to its end, recorded as stopped).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

from bench.faults.daemon import Daemon, category_daemon
from bench.faults.outcomes import Case, Category, Config, Outcome
from bench.faults.procs import alive, group_alive, kill_groups, newest_pids, wait_until
from bench.faults.toyrun import judge_toy_run, toy_job


def kill_shim(daemon: Daemon, job: str) -> int | None:
    """SIGKILL the shim of the job's newest attempt; its pid, or None if none ran."""
    pids = newest_pids(daemon.state, job)
    if pids is None or not alive(int(pids["shim_pid"])):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pids["shim_pid"]), signal.SIGKILL)
    return int(pids["shim_pid"])


def stop_after_shim_death(daemon: Daemon) -> Case:
    name = "graceful stop after the shim died"
    path, out = toy_job(
        daemon.work, "sk-stop", steps=100000, step_time=0.05, restart='stop_grace = "3s"\n'
    )
    daemon.cli("start", str(path))
    if not wait_until(lambda: (out / "steps.log").exists(), 30):
        return Case(name, Outcome.CRASH, "the job never made a step")
    pids = newest_pids(daemon.state, "sk-stop")
    assert pids is not None
    kill_shim(daemon, "sk-stop")
    time.sleep(0.5)
    res = daemon.cli("stop", "sk-stop")
    final = daemon.wait_final("sk-stop", 30)
    trainer_alive = group_alive(int(pids["pgid"]))
    kill_groups({int(pids["pgid"])})
    if trainer_alive:
        state = final.get("state") if final else "not final"
        return Case(
            name,
            Outcome.LOST,
            f"the trainer kept training after `stop` (job {state}); stop: {res.text[:200]}",
        )
    if final is None:
        return Case(name, Outcome.CRASH, "the job never reached a final state after `stop`")
    return Case(name, Outcome.OK, f"ended {final.get('state')}: {final.get('reason')}")


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    n_jobs, n_kills, steps = (2, 3, 80) if config.quick else (6, 20, 200)
    with category_daemon(config.root) as daemon:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        jobs = []
        for i in range(n_jobs):
            path, out = toy_job(daemon.work, f"sk{i}", steps=steps)
            daemon.cli("start", str(path))
            jobs.append((f"sk{i}", out))
        for k in range(n_kills):
            time.sleep(rng.uniform(0.2, 1.0))
            live = [
                j for j, _ in jobs if (p := newest_pids(daemon.state, j)) and alive(p["shim_pid"])
            ]
            if not live:
                continue  # all between attempts or done: nothing to kill this time
            job = rng.choice(live)
            shim = kill_shim(daemon, job)
            health = daemon.health()
            detail = f"killed shim {shim} of {job}"
            if health:
                cat.add(Case(f"kill {k + 1}", health[0], f"{health[1]} ({detail})"))
            else:
                cat.add(Case(f"kill {k + 1}", Outcome.OK, detail))
        for job, out in jobs:
            cat.add(judge_toy_run(daemon, job, out, steps, timeout=120))
        cat.add(stop_after_shim_death(daemon))
