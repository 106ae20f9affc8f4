"""The trainer↔supervisor contract: exit codes, `FTSUP_*` names, file and folder names.

The daemon, the shims, the built-in trainer and `FtsupCallback` run in
different processes (often different Python environments) and agree only
through these values. Each is defined here once so that the two sides cannot
drift; stdlib only, so that anyone may import it (as `manifest.py` and
`fingerprint.py`). The manifest's own name lives with the manifest
(`ftsup.supervisor.manifest.MANIFEST_NAME`).
"""

from __future__ import annotations

import re
from pathlib import PurePath

# Exit codes of the built-in trainer (docs: DESIGN.md "Exit codes"). Anything
# else, or a signal, is a failure that the restart policy judges.
EXIT_OK = 0  # training finished
EXIT_CONFIG = 2  # bad configuration or data: never restarted
EXIT_STOPPED = 75  # stopped on request after saving a checkpoint (EX_TEMPFAIL)

# Set by the daemon for every attempt (`daemon/launcher.py`).
ENV_JOB = "FTSUP_JOB"
ENV_ATTEMPT = "FTSUP_ATTEMPT"
ENV_OUTPUT_DIR = "FTSUP_OUTPUT_DIR"
ENV_PROGRESS_FILE = "FTSUP_PROGRESS_FILE"  # the trainer appends progress lines here
ENV_RESUME_FROM = "FTSUP_RESUME_FROM"  # only when resuming
ENV_SKIP_STEPS = "FTSUP_SKIP_STEPS"  # steps whose data to skip after a rollback
ENV_STANDBY_FD = "FTSUP_STANDBY_FD"  # a warm standby's end of its control socket
# A multi-node job's most nodes (`[launch] nnodes` > 1): a node that runs alone
# (`min_nodes`) still resumes the shared folder's newest checkpoint, not its own
# daemon's older view of it (trainer/nodes.py).
ENV_NODES = "FTSUP_NODES"
# The memory tier's lineage token (issue 18): a snapshot written under another
# token (an earlier run, a rollback) is never resumed.
ENV_MEMORY_LINEAGE = "FTSUP_MEMORY_LINEAGE"
# Set per attempt: a warm standby must match an attempt on every other variable.
PER_ATTEMPT_ENV = frozenset({ENV_ATTEMPT, ENV_RESUME_FROM, ENV_SKIP_STEPS, ENV_MEMORY_LINEAGE})
# Set per job; the trainer reads them once it runs, never at import: a daemon's
# spare standby, started before its job was known, may take any job's values.
PER_JOB_ENV = frozenset({ENV_JOB, ENV_OUTPUT_DIR, ENV_PROGRESS_FILE})
# The GPUs a placement gives an attempt: read when CUDA is initialised, which a
# standby does not do before it is activated.
DEVICE_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})

# Read by the daemon, CLI and TUI: where state and the socket live.
ENV_STATE_DIR = "FTSUP_STATE_DIR"
ENV_RUNTIME_DIR = "FTSUP_RUNTIME_DIR"
ENV_CLIENT_TIMEOUT = "FTSUP_CLIENT_TIMEOUT"
# The user's soft RLIMIT_NOFILE, from a daemon that raised its own, for the shims to restore.
ENV_USER_NOFILE = "FTSUP_USER_NOFILE"
# `N` or `N:MEM_GIB`: the daemon sees N simulated GPUs instead of NVML's (laptops, tests).
ENV_SIMULATE_GPUS = "FTSUP_SIMULATE_GPUS"

# Set for `[notify] command` hooks.
ENV_EVENT = "FTSUP_EVENT"

# The built-in trainer's fault injection (tests, `ftsup demo`, the fault suite).
ENV_FAULT_AT_STEP = "FTSUP_FAULT_AT_STEP"
ENV_FAULT_POINT = "FTSUP_FAULT_POINT"
ENV_FAULT_RANK = "FTSUP_FAULT_RANK"
ENV_FAULT_ONCE_FILE = "FTSUP_FAULT_ONCE_FILE"
ENV_FAULT_WRITE_DELAY = "FTSUP_FAULT_WRITE_DELAY"
ENV_FAULT_STEP_DELAY = "FTSUP_FAULT_STEP_DELAY"

# Files of an attempt folder (`runs/<job>/attempt-<n>/`), written by the shim.
EXIT_FILE = "exit.json"
PIDS_FILE = "pids.json"
LOG_FILE = "stdout.log"
# A run's progress lines (`runs/<job>/progress.jsonl`), appended by the trainer.
PROGRESS_FILE = "progress.jsonl"
# The built-in trainer's configuration (`runs/<job>/train.json`), written by the daemon.
TRAIN_CONFIG_FILE = "train.json"
# The lock a running attempt holds in its output folder (`outlock.py`).
OUTPUT_LOCK_NAME = ".ftsup.lock"
# The daemon's single-instance lock in its state folder.
DAEMON_LOCK_NAME = "daemon.lock"

# Command jobs' instrumentation: the folder (in the trainer package) that the daemon
# puts first on PYTHONPATH, and the progress lines its bootstrap writes. The
# bootstrap itself (bootstrap/sitecustomize.py) must not import ftsup at start-up,
# so it spells these names out; tests/test_contract.py holds it to this table.
BOOTSTRAP_DIR_NAME = "bootstrap"
PROGRESS_INSTRUMENTED = "instrumented"
PROGRESS_INSTRUMENT_FAILED = "instrument_failed"

# A sharded checkpoint was converted to resume on another world size (ZeRO universal).
PROGRESS_ELASTIC_CONVERT = "elastic_convert"
# A multi-node launcher waits in torchrun's rendezvous (`state`: "waiting"), and a
# node's trainer started with every node present (`state`: "joined").
PROGRESS_RENDEZVOUS = "rendezvous"

# The memory tier (issue 18): the built-in trainer keeps its newest training state
# in RAM (tmpfs), in one of two slots of the job's memory folder
# (`<memory dir>/slot-0|slot-1/checkpoint-<step>`): raw tensors, a small pickle and
# a log history (`ftsup.trainer.memory_snapshot`), sealed by MEMORY_RECORD, written
# last (job, lineage, step, attempt, fingerprint, format MEMORY_FORMAT, and each
# file's size). train.json's `memory` ({"dir", "every"}, optionally
# "max_overhead": the most of training's time the tier may take, which then
# spaces snapshots out) turns it on; each snapshot is reported as a
# PROGRESS_MEMORY_SNAPSHOT line (step, bytes, stall_s, slot, paced; `error` when
# the tier turned itself off), and a run that resumed a snapshot says
# `resumed_from_memory` in its train_start.
MEMORY_SLOTS = ("slot-0", "slot-1")
MEMORY_RECORD = "ftsup-memory.json"
MEMORY_FORMAT = 2  # 1: an HF checkpoint folder sealed by a manifest (never resumed now)
PROGRESS_MEMORY_SNAPSHOT = "memory_snapshot"

# Checkpoint folders: `checkpoint-<step>`. `\A...\Z`, not `^...$`: `$` also
# matches before a trailing newline ("checkpoint-8\n").
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"\Acheckpoint-([0-9]+)\Z")


def checkpoint_step(name: str | PurePath) -> int | None:
    """The step of a `checkpoint-<step>` folder name (or path), None for any other name."""
    base = name.name if isinstance(name, PurePath) else name
    match = CHECKPOINT_RE.match(base)
    return int(match.group(1)) if match else None


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (`checkpoint-<step>`)."""
    return f"{CHECKPOINT_PREFIX}{step}"
