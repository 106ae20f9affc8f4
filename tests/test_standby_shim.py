"""The standby shim's contract with real processes, with a small stand-in for the
trainer (no torch): activation hands over arguments, environment and the output
lock; discard and the daemon's death remove the standby; the lock is waited for
while an earlier attempt of the same job still holds it, and only then."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ftsup.supervisor import outlock
from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.daemon.launcher import AttemptPlan, spawn_standby_shim
from ftsup.supervisor.daemon.spares import SparePool
from ftsup.supervisor.daemon.standby import (
    Standby,
    StandbyKeeper,
    can_take_over,
    spare_can_take_over,
    take_warm,
)
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import group_members
from ftsup.supervisor.shim import EXIT_FILE, LOG_FILE, PIDS_FILE
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.standby_shim import STANDBY_FILE, standby_command
from tests.supervisor_harness import activate_standby, start_standby_shim, wait_for

# Stands in for `python -m ftsup.trainer.standby`: reports ready, waits for the
# activation, then writes what it received and whether it holds the lock.
STAND_IN = textwrap.dedent("""\
    import fcntl, json, os, socket, sys
    control = socket.socket(fileno=int(os.environ.pop("FTSUP_STANDBY_FD")))
    control.send(json.dumps({"ready_s": 0.01}).encode())
    message, fds, _, _ = socket.recv_fds(control, 1 << 20, 4)
    if not message:
        sys.exit(0)
    got = json.loads(message)
    probe = os.open(os.path.join(sys.argv[1], ".ftsup.lock"), os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False
    except BlockingIOError:
        held = True
    got["lock_held"] = held and len(fds) == 1
    with open(sys.argv[2], "w") as out:
        json.dump(got, out)
    sys.exit(int(got["args"][0]) if got["args"][0].isdigit() else 0)
""")


def _start_standby(tmp_path: Path, daemon: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    argv = [sys.executable, str(script), str(tmp_path / "out"), str(tmp_path / "got.json")]
    shim = start_standby_shim(tmp_path / "standby-1", tmp_path / "out", daemon.pid, argv)
    wait_for(
        lambda: (read_json(tmp_path / "standby-1" / STANDBY_FILE) or {}).get("state") == "ready",
        30,
        what="the stand-in to report ready",
    )
    return shim


@contextlib.contextmanager
def _reaped(shim: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()


def test_activation_hands_over_args_env_and_the_lock(
    tmp_path: Path, fake_daemon: subprocess.Popen[bytes]
) -> None:
    shim = _start_standby(tmp_path, fake_daemon)
    with _reaped(shim):
        info = read_json(tmp_path / "standby-1" / STANDBY_FILE)
        assert info["ready_s"] == 0.01 and info["trainer_pid"] != shim.pid
        activation = {"attempt": 4, "job": "j", "args": ["3", "--x"], "env": {"ONLY": "this"}}
        attempt_dir = tmp_path / "attempt-4"
        activate_standby(tmp_path / "standby-1", attempt_dir, activation)
        fake_daemon.kill()  # an activated standby outlives its daemon
        assert shim.wait(30) == 0
    got = json.loads((tmp_path / "got.json").read_text())
    assert got == {"args": ["3", "--x"], "env": {"ONLY": "this"}, "cwd": None, "lock_held": True}
    exit_info = read_json(attempt_dir / EXIT_FILE)
    assert exit_info["returncode"] == 3 and exit_info["trainer_pid"] == info["trainer_pid"]
    assert read_json(attempt_dir / PIDS_FILE)["trainer_pid"] == info["trainer_pid"]
    assert outlock.read_holder(tmp_path / "out") == {"job": "j", "attempt": 4, "pid": shim.pid}
    assert not outlock.is_locked(tmp_path / "out")
    assert (attempt_dir / LOG_FILE).exists()


@pytest.mark.parametrize("end", ["discard", "daemon_dies"])
def test_an_unused_standby_goes_without_a_trace(
    tmp_path: Path, fake_daemon: subprocess.Popen[bytes], end: str
) -> None:
    shim = _start_standby(tmp_path, fake_daemon)
    with _reaped(shim):
        trainer = read_json(tmp_path / "standby-1" / STANDBY_FILE)["trainer_pid"]
        if end == "discard":
            shim.send_signal(signal.SIGTERM)
        else:
            fake_daemon.kill()
        assert shim.wait(30) == 0
    assert not group_members(trainer)
    assert not (tmp_path / "standby-1").exists()
    assert not (tmp_path / "got.json").exists()


LOCK_HOLDER = "import sys, time; from ftsup.supervisor import outlock; " + (
    "fd = outlock.acquire(__import__('pathlib').Path(sys.argv[1]), "
    "{'job': sys.argv[2]}); print('held', flush=True); time.sleep(float(sys.argv[3]))"
)


def _hold_lock(out: Path, job: str, seconds: float) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", LOCK_HOLDER, str(out), job, str(seconds)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_is_waited_for_only_while_the_same_job_holds_it(tmp_path: Path) -> None:
    dying = _hold_lock(tmp_path, "j", 0.5)  # the killed attempt's last process
    try:
        began = time.monotonic()
        (fd,) = outlock.acquire_after_predecessor(tmp_path, {"job": "j"}, timeout=20)
        assert 0.2 < time.monotonic() - began < 15
        os.close(fd)
    finally:
        dying.kill()
        dying.wait()
    other = _hold_lock(tmp_path, "someone-else", 30)
    try:
        began = time.monotonic()
        with pytest.raises(outlock.OutputLocked):
            outlock.acquire_after_predecessor(tmp_path, {"job": "j"}, timeout=20)
        assert time.monotonic() - began < 1
    finally:
        other.kill()
        other.wait()


PYTHON = "/usr/bin/python3"
BASE = AttemptPlan(
    [PYTHON, "-m", "ftsup.trainer", "--config", "/r/train.json"],
    {"CUDA_VISIBLE_DEVICES": "0", "FTSUP_ATTEMPT": "0"},
    Path("/w"),
)


JOB_TEXT = '[job]\nname = "x"\noutput_dir = "/tmp/o"\n[train]\nmodel = "m"\ndataset = ["d"]\n'


def _plan(argv_tail: list[str] | None = None, cwd: str = "/w", **env: str) -> AttemptPlan:
    argv = [PYTHON, "-m", "ftsup.trainer", "--config", "/r/train.json", *(argv_tail or [])]
    return AttemptPlan(argv, {**BASE.env, **env}, Path(cwd))


def test_a_standby_runs_only_what_a_cold_start_would_run() -> None:
    resumed = _plan(["--resume-from", "/o/checkpoint-9"], FTSUP_ATTEMPT="3")
    assert can_take_over(BASE, resumed)
    assert can_take_over(BASE, _plan(FTSUP_SKIP_STEPS="10-12", FTSUP_RESUME_FROM="/o/c"))
    assert not can_take_over(BASE, _plan(CUDA_VISIBLE_DEVICES="1"))  # read before activation
    assert not can_take_over(BASE, _plan(HF_HOME="/elsewhere"))
    assert not can_take_over(BASE, _plan(cwd="/other"))
    other_config = AttemptPlan(
        [PYTHON, "-m", "ftsup.trainer", "--config", "/x.json"], BASE.env, BASE.cwd
    )
    assert not can_take_over(BASE, other_config)
    torchrun = AttemptPlan([PYTHON, "-m", "ftsup.trainer.distrun", "-m", "x"], BASE.env, BASE.cwd)
    assert not can_take_over(BASE, torchrun)


def test_a_spare_runs_any_built_in_trainer_job_of_the_daemons_environment() -> None:
    """Per-job, per-attempt and (CUDA untouched) device variables may differ; the
    config and folder come with the activation; anything an import may read may not."""
    spare = AttemptPlan([PYTHON, "-m", "ftsup.trainer.standby"], {"HF_HOME": "/h"}, Path("/s"))
    job = {"HF_HOME": "/h", "FTSUP_JOB": "a", "FTSUP_OUTPUT_DIR": "/o", "FTSUP_ATTEMPT": "1"}
    gpus = {**job, "CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    argv = [PYTHON, "-m", "ftsup.trainer", "--config", "/runs/a/train.json"]
    assert spare_can_take_over(spare, AttemptPlan(argv, job, Path("/w")), cuda_initialized=False)
    assert spare_can_take_over(spare, AttemptPlan(argv, gpus, Path("/w")), cuda_initialized=False)
    # An import initialised CUDA in the spare: its devices are fixed now.
    assert not spare_can_take_over(
        spare, AttemptPlan(argv, gpus, Path("/w")), cuda_initialized=True
    )
    assert spare_can_take_over(spare, AttemptPlan(argv, job, Path("/w")), cuda_initialized=True)
    other_home = AttemptPlan(argv, {**job, "HF_HOME": "/x"}, Path("/w"))
    assert not spare_can_take_over(spare, other_home, cuda_initialized=False)
    other_python = AttemptPlan(["/opt/py", *argv[1:]], job, Path("/w"))
    assert not spare_can_take_over(spare, other_python, cuda_initialized=False)
    torchrun = AttemptPlan([PYTHON, "-m", "ftsup.trainer.distrun", "-m", "x"], job, Path("/w"))
    assert not spare_can_take_over(spare, torchrun, cuda_initialized=False)


def test_a_spare_learns_its_job_and_folders_from_the_activation(tmp_path: Path) -> None:
    """Started as the daemon starts a spare (no job, no output folder), activated as
    the daemon activates one: the lock is taken in the job's output folder, for
    the job, and the trainer is told the job's working folder."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = tmp_path / "job-out"
    out.mkdir()
    argv = [sys.executable, str(script), str(out), str(tmp_path / "got.json")]
    folder = tmp_path / "spares" / "standby-1"
    folder.parent.mkdir()
    plan = AttemptPlan(argv, {**os.environ}, tmp_path)
    shim = spawn_standby_shim(None, folder, plan=plan, standby_argv=argv)  # this test: its daemon
    with _reaped(shim):
        wait_for(lambda: (read_json(folder / STANDBY_FILE) or {}).get("state") == "ready", 30)
        spare = Standby(folder, shim, None, plan, spare=True)
        spec = parse_spec(JOB_TEXT.replace("/tmp/o", str(out)), tmp_path / "job" / "x.toml")
        job_plan = AttemptPlan(
            [PYTHON, "-m", "ftsup.trainer", "--config", "/r/train.json"],
            {"ONLY": "this"},
            tmp_path / "job",
        )
        assert spare.activate(tmp_path / "attempt-1", 1, spec, job_plan)
        assert shim.wait(30) == 0
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["args"] == ["--config", "/r/train.json"] and got["env"] == {"ONLY": "this"}
    assert got["cwd"] == str(tmp_path / "job") and got["lock_held"]
    assert outlock.read_holder(out) == {"job": "x", "attempt": 1, "pid": shim.pid}
    assert read_json(tmp_path / "attempt-1" / "command.json")["spare"] is True


def test_a_spare_activated_without_an_output_folder_ends_with_the_reason(
    tmp_path: Path, fake_daemon: subprocess.Popen[bytes]
) -> None:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    argv = [sys.executable, str(script), str(tmp_path / "out"), str(tmp_path / "got.json")]
    folder = tmp_path / "standby-1"
    folder.mkdir()
    os.mkfifo(folder / "activate")
    shim_argv = standby_command(folder, None, None, 5.0, fake_daemon.pid, argv)
    shim = subprocess.Popen(shim_argv, start_new_session=True)
    with _reaped(shim):
        wait_for(lambda: (read_json(folder / STANDBY_FILE) or {}).get("state") == "ready", 30)
        trainer = read_json(folder / STANDBY_FILE)["trainer_pid"]
        activate_standby(folder, tmp_path / "attempt-1", {"attempt": 1, "args": [], "env": {}})
        assert shim.wait(30) == 1
    assert read_json(tmp_path / "attempt-1" / EXIT_FILE)["error"] == "activation"
    assert not group_members(trainer)
    assert not (tmp_path / "got.json").exists()


def test_a_launch_prefers_a_ready_standby_and_the_jobs_own_first(tmp_path: Path) -> None:
    """Order: the job's ready standby, a ready spare, the job's warming one, a warming
    spare. Standbys here are folders with standby.json and a live process."""
    spec = parse_spec(JOB_TEXT, tmp_path / "x.toml")
    layout = Layout.from_env(tmp_path / "state", tmp_path / "rt")
    keeper = StandbyKeeper(spec, tmp_path / "run", lambda *_: None)
    spares = SparePool(layout, {}, lambda *_: None, 1)
    argv = [sys.executable, "-m", "ftsup.trainer", "--config", "/r/t.json"]
    plan = AttemptPlan(argv, spares.plan.env, BASE.cwd)  # the daemon's environment
    shims = []

    def standby(name: str, state: str, *, spare: bool) -> Standby:
        folder = tmp_path / name
        folder.mkdir()
        (folder / STANDBY_FILE).write_text(json.dumps({"state": state}))
        shims.append(subprocess.Popen(["sleep", "30"], start_new_session=True))
        return Standby(folder, shims[-1], None, spares.plan if spare else plan, spare=spare)

    try:
        own_warming = standby("own-warming", "warming", spare=False)
        spare_ready = standby("spare-ready", "ready", spare=True)
        keeper.pool, spares.pool = [own_warming], [spare_ready]
        assert take_warm([keeper, spares], plan) == (spares, spare_ready)
        assert take_warm([keeper, spares], plan) == (keeper, own_warming)
        spare_warming = standby("spare-warming", "warming", spare=True)
        own_ready = standby("own-ready", "ready", spare=False)
        keeper.pool, spares.pool = [own_ready], [spare_warming]
        assert take_warm([keeper, spares], plan) == (keeper, own_ready)
        assert take_warm([keeper, spares], plan) == (spares, spare_warming)
        assert take_warm([keeper, spares], plan) is None
        # A spare that does not fit this job stays for another one.
        other = standby("spare-other", "ready", spare=True)
        spares.pool = [other]
        assert take_warm([spares], replace(plan, env={**plan.env, "HF_HOME": "/x"})) is None
        assert spares.pool == [other]
    finally:
        for shim in shims:
            shim.kill()
            shim.wait()


def test_the_daemon_warns_when_a_standby_initialised_cuda(tmp_path: Path) -> None:
    """`cuda_initialized` in standby.json (it never is on CPU) becomes a warning event."""
    from ftsup.supervisor.daemon.standby import Standby, StandbyKeeper
    from ftsup.supervisor.standby_shim import STANDBY_FILE as INFO

    emitted: list[tuple[str, str]] = []
    keeper = StandbyKeeper(
        parse_spec(JOB_TEXT, tmp_path / "x.toml"),
        tmp_path,
        lambda kind, message, _data: emitted.append((kind, message)),
    )
    folder = tmp_path / "standby-1"
    folder.mkdir()
    info = {"state": "ready", "ready_s": 4.0, "trainer_pid": 1, "cuda_initialized": True}
    (folder / INFO).write_text(json.dumps(info))
    shim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        keeper.pool = [Standby(folder, shim, None, BASE)]
        keeper.keep_warm(lambda: BASE, start_one=False)
        keeper.keep_warm(lambda: BASE, start_one=False)  # reported once
    finally:
        shim.kill()
        shim.wait()
    assert [kind for kind, _ in emitted] == ["standby_ready", "warning"]
    assert "holds GPU memory" in emitted[1][1]


def test_activating_a_standby_whose_shim_is_gone_falls_back(tmp_path: Path) -> None:
    """No reader on the FIFO (ENXIO): the folder is renamed back and the caller starts cold."""
    from ftsup.supervisor.daemon.standby import Standby
    from ftsup.supervisor.standby_shim import FIFO_NAME

    folder = tmp_path / "standby-1"
    folder.mkdir()
    os.mkfifo(folder / FIFO_NAME)
    shim = subprocess.Popen(["true"])
    shim.wait()
    standby = Standby(folder, shim, None, BASE)
    spec = parse_spec(JOB_TEXT, tmp_path / "x.toml")
    assert not standby.activate(tmp_path / "attempt-2", 2, spec, _plan(FTSUP_ATTEMPT="2"))
    assert folder.is_dir() and not (tmp_path / "attempt-2").exists()
    assert standby.directory == folder


def test_a_standby_discarded_before_its_shim_set_its_handler_leaves_no_folder(
    tmp_path: Path,
) -> None:
    """SIGTERM's default action kills a shim that has not set its handler yet (it has
    started no trainer then): the daemon removes the folder once the shim is gone."""
    from ftsup.supervisor.daemon.standby import Standby, StandbyKeeper
    from ftsup.supervisor.procinfo import process_start_time

    keeper = StandbyKeeper(parse_spec(JOB_TEXT, tmp_path / "x.toml"), tmp_path, lambda *_: None)
    folder = tmp_path / "standby-1"
    folder.mkdir()
    shim = subprocess.Popen(["sleep", "30"], start_new_session=True)  # no SIGTERM handler
    try:
        keeper.pool = [Standby(folder, shim, process_start_time(shim.pid), BASE)]
        keeper.discard()
        assert keeper.discarding
        shim.wait(timeout=10)
        keeper.keep_warm(lambda: BASE, start_one=False)
    finally:
        shim.kill()
        shim.wait()
    assert not folder.exists()
    assert not keeper.discarding


def test_a_standby_that_cannot_start_for_a_reason_of_the_moment_is_tried_again(
    tmp_path: Path,
) -> None:
    """No descriptor left (a real EMFILE: the soft limit lowered under every fd number
    while the keeper starts one) is not a lost standby: nothing reported or counted,
    its folder removed on the next pass, which starts it. A plan that cannot run (its working
    folder is gone) is a loss, reported."""
    import resource

    emitted: list[str] = []
    keeper = StandbyKeeper(
        parse_spec(JOB_TEXT, tmp_path / "x.toml"),
        tmp_path / "run",
        lambda kind, _message, _data: emitted.append(kind),
    )
    (tmp_path / "run").mkdir()
    plan = _plan(cwd=str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # open fds stay; new ones fail
    try:
        keeper.keep_warm(lambda: plan, start_one=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (keeper.pool, keeper.losses, emitted) == ([], 0, [])
    assert keeper.wanted
    try:
        keeper.keep_warm(lambda: plan, start_one=True)
        assert len(keeper.pool) == 1 and keeper.pool[0].alive()
        # The failed start's folder (not removable without a descriptor) is gone too.
        assert list((tmp_path / "run").iterdir()) == [keeper.pool[0].directory]
    finally:
        for standby in keeper.pool:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(standby.shim.pid, signal.SIGKILL)
            standby.shim.wait()
    keeper.pool = []
    keeper.keep_warm(lambda: _plan(cwd=str(tmp_path / "gone")), start_one=True)
    assert (keeper.losses, emitted) == (1, ["standby_lost"])
