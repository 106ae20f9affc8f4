"""A `[command]` job across two nodes (issue 17): an unmodified HF script under plain
`torchrun`, one daemon per node, one resume point for both.

Two daemons with their own state and runtime folders stand in for two nodes.
Both are given the same job file: `[launch] nnodes = 2` with a c10d endpoint
on 127.0.0.1, and a `[command]` whose argv is `torchrun script.py ...` without
any rendezvous option (the daemon passes `[launch]` on as torchrun's `PET_*`
defaults). `tests/scripts/plain_hf_train.py` knows nothing of ftsup.

Both ranks wait after step 5 (checkpoint-4 on disk); the second node's rank is
SIGKILLed, the first's fails on its next all-reduce, both daemons restart, and
both second attempts resume checkpoint-4: rank 0's choice, made inside the
workers by ftsup's instrumentation and published in torchrun's store. The run
ends with the weights of the same command run as two processes on one node.
A last test gives the two nodes' workers different suggestions (what each
daemon may see of a shared folder) and checks that both resume rank 0's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from ftsup.supervisor.contract import ENV_OUTPUT_DIR, ENV_PROGRESS_FILE, ENV_RESUME_FROM
from ftsup.supervisor.daemon.launcher import bootstrap_dir
from tests.supervisor_harness import REPO, Harness, wait_for
from tests.trainer.test_multinode import free_port

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

SCRIPT = REPO / "tests" / "scripts" / "plain_hf_train.py"
JOB = "cmn"
MAX_STEPS = 8
HOLD_AFTER = 5  # both ranks wait after this step (checkpoint-4 is on disk)
ENDED = ("finished", "failed", "gave_up", "stopped")
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # One thread per rank on both sides: torchrun sets it for the two-process
    # reference only, and a matmul summed with another thread count differs.
    "OMP_NUM_THREADS": "1",
}


def script_args(model: Path, output_dir: Path) -> list[str]:
    return [
        str(SCRIPT),
        *("--model_name_or_path", str(model), "--output_dir", str(output_dir)),
        *("--max_steps", str(MAX_STEPS), "--save_steps", "2", "--logging_steps", "1"),
        *("--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--seed", "0"),
        *("--use_cpu", "--report_to", "none", "--disable_tqdm", "true"),
        *("--dataloader_num_workers", "0"),
    ]


def job_text(model: Path, output_dir: Path, holds: Path, endpoint: str) -> str:
    argv = [sys.executable, "-m", "torch.distributed.run", *script_args(model, output_dir)]
    env = ", ".join(f"{key} = {json.dumps(value)}" for key, value in ENV.items())
    return (
        f'[job]\nname = "{JOB}"\noutput_dir = "{output_dir}"\n\n'
        f"[command]\nargv = {json.dumps([*argv, '--hold_dir', str(holds)])}\n"
        f"env = {{ {env} }}\n"
        'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]\n\n'
        '[restart]\nbackoff = "0.2s"\nbackoff_max = "1s"\n\n'
        f'[launch]\nnnodes = 2\nnproc_per_node = 1\nrdzv_endpoint = "{endpoint}"\n'
    )


@dataclass
class Run:
    first: Harness
    second: Harness
    shared: Path
    reference: Path
    killed_pid: int
    statuses: list[dict[str, Any]]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTSUP_", "PET_"))}
    return {**env, **ENV, **extra}


def run_reference(model: Path, root: Path) -> Path:
    """The same script as two processes on one node, uninstrumented, never interrupted."""
    out = root / "reference"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    with (root / "reference.log").open("wb") as log:
        proc = subprocess.Popen(
            [*argv, *script_args(model, out)],
            env=clean_env({}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == 0, (root / "reference.log").read_text(errors="replace")[-3000:]
    return out


def held_worker(node: Harness) -> int:
    """The node's rank, waiting after HOLD_AFTER: its pid, as the instrumentation reported it."""

    def held() -> int | None:
        status = node.status(JOB)
        pid = (status.get("instrumentation") or {}).get("pid")
        step = (status.get("progress") or {}).get("step")
        return int(pid) if pid and step == HOLD_AFTER else None

    pid = int(wait_for(held, 240, 0.2, f"the second node's rank to wait after step {HOLD_AFTER}"))
    assert SCRIPT.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


@pytest.fixture(scope="module")
def run(tiny_model: Path) -> Iterator[Run]:
    first, second = Harness(), Harness()
    try:
        shared, holds = first.work / "shared-out", first.work / "holds"
        holds.mkdir()
        (holds / f"hold-{HOLD_AFTER}").touch()
        text = job_text(tiny_model, shared, holds, f"127.0.0.1:{free_port()}")
        for node in (first, second):
            node.start_daemon()
            path = node.work / f"{JOB}.toml"
            path.write_text(text)
            node.cli("start", str(path))
        pid = held_worker(second)
        os.kill(pid, signal.SIGKILL)
        (holds / f"hold-{HOLD_AFTER}").unlink()
        statuses = [node.wait_state(JOB, *ENDED, timeout=300) for node in (first, second)]
        yield Run(first, second, shared, run_reference(tiny_model, first.work), pid, statuses)
    except BaseException:
        for node in (first, second):
            print(f"--- daemon log ---\n{node.daemon_log()[-4000:]}")
        raise
    finally:
        for node in (first, second):
            node.cleanup()


def test_both_nodes_finish_after_one_nodes_rank_was_killed(run: Run) -> None:
    assert [s["state"] for s in run.statuses] == ["finished", "finished"], run.statuses
    assert [s["restarts"] for s in run.statuses] == [1, 1]


def test_each_launcher_joined_the_rendezvous_from_the_job_files_launch_section(run: Run) -> None:
    for node in (run.first, run.second):
        waits = [r for r in node.progress_lines(JOB) if r.get("event") == "rendezvous"]
        assert [r["state"] for r in waits] == ["waiting", "joined"] * 2, waits
        assert waits[0]["rdzv_id"] == f"ftsup-{JOB}" and waits[1]["world_size"] == 2


def test_both_nodes_resumed_the_same_checkpoint(run: Run) -> None:
    expected = [None, str(run.shared / "checkpoint-4")]
    for node in (run.first, run.second):
        starts = [r for r in node.progress_lines(JOB) if r.get("event") == "train_start"]
        assert [s["resumed_from"] for s in starts] == expected
        assert [s["step"] for s in starts] == [0, 4]


def test_the_run_ends_with_the_weights_of_the_same_script_on_one_node(run: Run) -> None:
    got = load_file(str(run.shared / "model.safetensors"))
    want = load_file(str(run.reference / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(got[name].equal(want[name]) for name in want)


def test_every_rank_resumes_rank_0s_choice_whatever_its_daemon_suggested(
    run: Run, tiny_model: Path, tmp_path: Path
) -> None:
    """What each node's daemon suggests may differ (a save another node still
    flushes): 4 on one node, 6 on the other. Both resume 6, rank 0's choice (the
    newest valid one), whichever node the rendezvous made rank 0."""
    out = tmp_path / "out"
    out.mkdir()
    for step in (4, 6):
        shutil.copytree(run.shared / f"checkpoint-{step}", out / f"checkpoint-{step}")
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    rdzv += [f"--rdzv-endpoint={endpoint}", "--rdzv-id=agree", "--max-restarts=0"]
    procs = []
    for suggested in ("checkpoint-4", "checkpoint-6"):
        extra = {
            "PYTHONPATH": str(bootstrap_dir()),
            ENV_OUTPUT_DIR: str(out),
            ENV_RESUME_FROM: str(out / suggested),
            ENV_PROGRESS_FILE: str(tmp_path / f"{suggested}.jsonl"),
        }
        argv = [sys.executable, "-m", "torch.distributed.run", *rdzv, *script_args(tiny_model, out)]
        argv += ["--resume_from_checkpoint", str(out / suggested)]
        log = (tmp_path / f"{suggested}.log").open("wb")
        procs.append(
            subprocess.Popen(
                argv,
                env=clean_env(extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    # Within pytest's own timeout, so that a launcher that never ends (seen once in
    # CI, unexplained) fails with both logs instead of a bare timeout.
    deadline = time.monotonic() + 200
    codes: list[int] | str = "still running after 200 s"
    try:
        codes = [proc.wait(max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = {s: (tmp_path / f"{s}.log").read_text() for s in ("checkpoint-4", "checkpoint-6")}
    assert codes == [0, 0], logs
    for suggested in logs:
        lines = (tmp_path / f"{suggested}.jsonl").read_text().splitlines()
        starts = [json.loads(line) for line in lines if '"train_start"' in line]
        assert [(s["step"], s["resumed_from"]) for s in starts] == [(6, str(out / "checkpoint-6"))]
    said = "".join(logs.values())
    assert f"rank 0 resumes every node from {out / 'checkpoint-6'}" in said
