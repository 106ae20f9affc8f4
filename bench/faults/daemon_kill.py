"""Daemon SIGKILLs: jobs run while the daemon is SIGKILLed at random moments and
restarted; every job must be re-adopted and end finished, with the exact result,
the expected number of attempts (one more per planned crash, none for a daemon
kill), one trainer at a time and every restart from the newest valid checkpoint.

Cases: one per kill (the restarted daemon answers: ok; else crash) and one per
job (ok, or data lost).
"""

from __future__ import annotations

import random
import time

from bench.faults.daemon import Daemon, category_daemon, traceback_summaries
from bench.faults.outcomes import Case, Category, Config, Outcome
from bench.faults.toyrun import judge_toy_run, toy_job


def run(config: Config, cat: Category) -> None:
    rng = random.Random(config.seed)
    n_jobs, n_kills, steps = (3, 4, 50) if config.quick else (10, 25, 150)
    with category_daemon(config.root) as daemon:
        if not daemon.start():
            raise RuntimeError(f"the daemon did not start; see {daemon.log}")
        jobs = []
        for i in range(n_jobs):
            crash = i % 3 == 1  # a third of the jobs crash once: one restart expected
            args = ("--crash-at", str(steps // 2 + 3)) if crash else ()
            path, out = toy_job(daemon.work, f"dk{i}", steps=steps, args=args)
            res = daemon.cli("start", str(path))
            if res.rc != 0:
                raise RuntimeError(f"could not submit dk{i}: {res.text}")
            jobs.append((f"dk{i}", out, 2 if crash else 1))
        for k in range(n_kills):
            time.sleep(rng.uniform(0.05, 1.0))
            daemon.kill()
            time.sleep(rng.uniform(0.0, 0.5))  # down for a moment; the runs go on
            began = time.monotonic()
            ok = daemon.start()
            name = f"kill {k + 1}"
            if ok:
                cat.add(Case(name, Outcome.OK, f"answered {time.monotonic() - began:.1f}s later"))
            else:
                cat.add(
                    Case(
                        name,
                        Outcome.CRASH,
                        f"the restarted daemon did not answer: {daemon.new_log()[-600:]}",
                    )
                )
                daemon.kill()
                daemon.start()
        log = daemon.new_log()
        if "Traceback" in log:
            cat.add(Case("daemon log", Outcome.CRASH, "; ".join(traceback_summaries(log)[:3])))
        for job, out, attempts in jobs:
            cat.add(judge_toy_run(daemon, job, out, steps, timeout=120, attempts=attempts))
        cat.add(after_restart(daemon, [(job, attempts) for job, _, attempts in jobs], steps))


def after_restart(daemon: Daemon, jobs: list[tuple[str, int]], steps: int) -> Case:
    """One more kill once every job finished: the new daemon must still know each
    job's last step and restarts (they showed step `-` and 0 restarts)."""
    daemon.kill()
    if not daemon.start():
        return Case("finished jobs after a restart", Outcome.CRASH, "the daemon did not answer")
    wrong = []
    for job, attempts in jobs:
        status = daemon.status(job) or {}
        step = (status.get("progress") or {}).get("step")
        if status.get("state") != "finished" or step != steps:
            wrong.append(f"{job}: {status.get('state')} at step {step}")
        elif status.get("restarts") != attempts - 1:
            wrong.append(f"{job}: {status.get('restarts')} restarts, expected {attempts - 1}")
    if wrong:
        return Case("finished jobs after a restart", Outcome.LOST, "; ".join(wrong))
    return Case("finished jobs after a restart", Outcome.OK, f"{len(jobs)} jobs as they ended")
