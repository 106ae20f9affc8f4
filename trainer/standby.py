"""`python -m ftsup.trainer.standby [--config RUN/train.json]`: a trainer that waits, warm.

Started by `ftsup.supervisor.standby_shim` while the job's current attempt
trains. It imports torch, transformers and peft and tokenizes the data set,
reports `ready` with how long that took, and blocks until the shim hands it an
attempt: the trainer's arguments, its environment, and the output-folder lock
descriptor. Then it becomes that attempt (`run.main`), with the data it
already prepared when nothing it depends on changed meanwhile.

Without `--config` it is a daemon's spare (`ftsup.supervisor.daemon.spares`):
started before any job, it only imports, and its activation also names the
working folder to move to; the run then tokenizes its data itself.

Waiting costs no GPU memory: CUDA is never initialised before activation
(`PYTORCH_NVML_BASED_CUDA_CHECK` keeps even the availability check off the
driver), and the base model is not loaded, because for QLoRA loading means
quantising on the GPU, and for big models a second host copy is not cheap.
The result of a taken-over run is identical to a cold restart's: activation
runs the same `run.main` from the same checkpoint, with the same environment.

Warming never competes with the training it stands by for: the warm-up runs
in a thread at `SCHED_IDLE` and the idle I/O class (both per thread on
Linux), so it only gets a core that nothing else wants. The main thread stays
at normal priority and becomes the trainer: an unprivileged process cannot
leave `SCHED_IDLE` (that needs RLIMIT_NICE >= 20 or CAP_SYS_NICE), which is
why the warm-up is not the whole process. Threads inherit their creator's
policy, so the helper threads the warm-up would start are started beforehand
by the main thread (numpy's OpenBLAS, pyarrow's jemalloc purger) or not at
all (tokenizers' rayon pool); `raise_leftovers` handles the rest at takeover.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import importlib
import json
import os
import platform
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_ATTEMPT, ENV_STANDBY_FD
from ftsup.supervisor.spec_types import TrainSection
from ftsup.supervisor.standby_shim import MAX_MESSAGE
from ftsup.trainer.prepared import PreparedData


def warm_imports() -> None:
    """Everything a run imports before its first step, imported now."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    # accelerate imports DeepSpeed, when it is installed, as the Trainer unwraps its
    # model (`extract_model_from_parallel`): every run pays it, LoRA ones included.
    with contextlib.suppress(ImportError):
        import deepspeed  # noqa: F401

    import ftsup.supervisor.checkpoints.discovery  # the resume's checks: 15 ms
    import ftsup.supervisor.checkpoints.drift_guard
    import ftsup.trainer.async_save
    import ftsup.trainer.callback
    import ftsup.trainer.checkpointing
    import ftsup.trainer.deepspeed_configs
    import ftsup.trainer.memory_tier
    import ftsup.trainer.model
    import ftsup.trainer.skipping  # noqa: F401

    # Imported on the first model load and checkpoint load (private, so optional).
    for module in ("peft.utils.transformers_weight_conversion", "torch.utils.serialization"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    build_weight_conversions()


def job_train(config_path: str | None) -> TrainSection | None:
    """The job's `[train]` table from its train.json, or None (a daemon's spare has
    no job; a file that cannot be read now is the activated run's to report, as a
    cold start would: no failure here may end the standby)."""
    if config_path is None:
        return None
    from ftsup.trainer.config import load_run_config

    try:
        return load_run_config(Path(config_path), check_files=False).train
    except Exception:
        return None


def warm_model_code(train: TrainSection | None) -> None:
    """Import the modelling module of the job's architecture (`modeling_llama`: 6 ms
    on the takeover's path otherwise), read from the model's config without network
    (`local_files_only`); nothing where that is not possible (a spare has no job)."""
    if train is None:
        return
    with contextlib.suppress(Exception):
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        model_type = AutoConfig.from_pretrained(train.model, local_files_only=True).model_type
        name = model_type_to_module_name(model_type)
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def build_weight_conversions() -> None:
    """transformers 5 builds its table of checkpoint weight renamings (hundreds of
    regular expressions) on the first `from_pretrained` of a process and keeps it:
    built here, it is off the takeover's path (50-60 ms of the tiny job's 150 ms
    from activation to `train_start`). Private API: skipped where it differs."""
    with contextlib.suppress(Exception):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")  # type: ignore[no-untyped-call]


def warm_data(train: TrainSection | None) -> PreparedData | None:
    """The tokenized data set, or None when it cannot be built now (or there is no
    job yet: a daemon's spare): the activated run then builds it itself and
    reports any problem exactly as a cold start would, so no failure here may
    end the standby."""
    if train is None:
        return None
    from ftsup.trainer.prepared import prepare_data

    try:
        return prepare_data(train)
    except Exception:
        return None


def wait_for_attempt(control: socket.socket) -> dict[str, Any] | None:
    """The activation message (args, env; the lock descriptor is kept open), or None
    when the shim closed the socket: the standby was discarded."""
    try:
        message, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 4)
    except OSError:
        return None
    if not message:
        return None
    activation: dict[str, Any] = json.loads(message)
    activation["lock_fds"] = fds  # held until this process exits, like a cold trainer's
    return activation


# ioprio_set / ioprio_get syscall numbers (Python has no wrapper for them).
_IOPRIO_SYSCALLS = {
    "x86_64": (251, 252),
    "aarch64": (30, 31),
    "riscv64": (30, 31),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
}
IOPRIO_WHO_PROCESS = 1  # `who` is a thread id
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_IDLE = 3
SCHED_POLICY_NAMES = {0: "SCHED_OTHER", 3: "SCHED_BATCH", 5: "SCHED_IDLE"}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _ioprio(call: int, tid: int, value: int | None = None) -> int:
    """ioprio_set (value given) or ioprio_get of thread `tid`; OSError on failure."""
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"ioprio syscalls unknown on {platform.machine()}")
    libc = _libc()
    args = (IOPRIO_WHO_PROCESS, tid) if value is None else (IOPRIO_WHO_PROCESS, tid, value)
    result = int(libc.syscall(numbers[call], *args))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def io_class(tid: int) -> int:
    """The I/O scheduling class of thread `tid` (0 none, 1 realtime, 2 best-effort, 3 idle)."""
    return _ioprio(1, tid) >> IOPRIO_CLASS_SHIFT


def set_io_class(tid: int, io_class_: int) -> None:
    _ioprio(0, tid, io_class_ << IOPRIO_CLASS_SHIFT)


def sched_policy(tid: int, pid: int | None = None) -> int:
    """The scheduling policy of thread `tid` (field 41 of its stat), as the kernel has it."""
    stat = Path(f"/proc/{pid or os.getpid()}/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[38])


def lower_this_thread() -> dict[str, str]:
    """SCHED_IDLE and the idle I/O class for the calling thread only; what was applied."""
    applied = {"scope": "warm-up thread"}
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
        policy = sched_policy(threading.get_native_id())
        applied["cpu"] = SCHED_POLICY_NAMES.get(policy, f"policy {policy}")
    except OSError as exc:
        applied["cpu"] = f"unchanged ({exc})"
    try:
        set_io_class(threading.get_native_id(), IOPRIO_CLASS_IDLE)
        now = io_class(threading.get_native_id())
        applied["io"] = "idle" if now == IOPRIO_CLASS_IDLE else f"class {now}"
    except OSError as exc:
        applied["io"] = f"unchanged ({exc})"
    return applied


def raise_leftovers() -> list[str]:
    """Threads the warm-up created inherited its priority: put them back to normal, as
    far as allowed. The I/O class always can be; SCHED_IDLE only with CAP_SYS_NICE or
    RLIMIT_NICE >= 20. Returns the names of those that stay idle: helper threads some
    import started that `THREAD_STARTING_MODULES` does not know yet. Training itself
    runs on the main thread and the threads it creates (torch's pool, the writer)."""
    idle = []
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        with contextlib.suppress(OSError):  # a thread that just ended
            if io_class(tid) == IOPRIO_CLASS_IDLE:
                set_io_class(tid, 0)
        try:
            if sched_policy(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            with contextlib.suppress(OSError):
                idle.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return idle


class WarmUp(threading.Thread):
    """Imports and data, in a thread at idle CPU and I/O priority (`lower`)."""

    def __init__(self, config_path: str | None, *, lower: bool) -> None:
        super().__init__(name="ftsup-warm-up", daemon=True)
        self.config_path = config_path
        self.lower = lower
        self.hurry = threading.Event()  # activated meanwhile: leave the data to the trainer
        self.priority: dict[str, str] = {"scope": "none", "cpu": "normal", "io": "normal"}
        self.prepared: PreparedData | None = None
        self.frozen = 0  # objects the warm-up left out of the collector's sight
        self.tid = 0
        self.done_r, self._done_w = os.pipe()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            if self.lower:
                self.priority = lower_this_thread()
            # Single texts gain nothing from tokenizers' pool, and a pool created here
            # would tokenize at idle priority for good: none is created while warming.
            with _environ(TOKENIZERS_PARALLELISM="false"):
                warm_imports()
                train = None if self.hurry.is_set() else job_train(self.config_path)
                if not self.hurry.is_set():
                    warm_model_code(train)
                if not self.hurry.is_set():
                    self.prepared = warm_data(train)
            if not self.hurry.is_set():
                self.frozen = freeze_heap()
        finally:
            os.close(self._done_w)

    def rush(self) -> None:
        """Activation came first: the trainer waits for what is left of the warm-up."""
        self.hurry.set()
        if not self.tid:
            return  # not started yet (0 would mean the calling thread)
        with contextlib.suppress(OSError):  # only with CAP_SYS_NICE / RLIMIT_NICE >= 20
            os.sched_setscheduler(self.tid, os.SCHED_OTHER, os.sched_param(0))
        with contextlib.suppress(OSError):
            set_io_class(self.tid, 0)


def freeze_heap() -> int:
    """Collect once, then move every object the warm-up built (modules, tokenized
    data) out of the collector's sight (`gc.freeze`); returns how many.

    HF Trainer calls `gc.collect()` as training starts (`accelerator.free_memory()`
    in `_inner_training_loop`). In a process that imported torch, transformers,
    peft and DeepSpeed that full collection took 0.2 s on the tiny job, on the
    takeover's critical path; after the freeze it walks only what the takeover
    built. Nothing frozen is garbage: the collection just before found it alive.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Imported by the warm-up anyway (torch, transformers), and they start threads when
# imported: numpy its OpenBLAS pool, pyarrow (pandas imports it) a jemalloc purger.
# Imported first, from the main thread, those threads keep its normal priority.
THREAD_STARTING_MODULES = ("numpy", "pyarrow")


def import_thread_starters() -> None:
    for name in THREAD_STARTING_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def warm(control: socket.socket, config_path: str | None, *, lower: bool) -> WarmUp:
    """Run the warm-up to its end; speed it up if the activation arrives meanwhile."""
    import_thread_starters()
    warm_up = WarmUp(config_path, lower=lower)
    warm_up.start()
    watched: list[Any] = [warm_up.done_r, control]
    while warm_up.done_r not in select.select(watched, [], [])[0]:
        warm_up.rush()
        watched.remove(control)
    warm_up.join()
    os.close(warm_up.done_r)
    return warm_up


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftsup.trainer.standby")
    parser.add_argument(
        "--config",
        default=None,
        help="train.json written by ftsup (none: a daemon's spare, whose job comes later)",
    )
    return parser.parse_args(argv)


def move_to(cwd: str | None) -> None:
    """Into the activated job's folder: a spare was started before it had one. The
    folder `python -m` put first on sys.path follows, as if started there."""
    if not cwd:
        return
    started_in = os.getcwd()
    os.chdir(cwd)
    if sys.path and sys.path[0] == started_in:
        sys.path[0] = os.getcwd()


def main(argv: Sequence[str] | None = None, *, lower_priority: bool = True) -> int:
    """`lower_priority=False` warms at normal priority (for comparisons: bench/)."""
    args = parse_args(argv)
    control = socket.socket(fileno=int(os.environ.pop(ENV_STANDBY_FD)))
    began = time.monotonic()
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    warm_up = warm(control, args.config, lower=lower_priority)
    prepared = warm_up.prepared
    import torch

    ready = {
        "ready_s": round(time.monotonic() - began, 3),
        "data_prepared": prepared is not None,
        "cuda_initialized": bool(torch.cuda.is_initialized()),  # type: ignore[no-untyped-call]
        "warm_priority": warm_up.priority,
        "frozen_objects": warm_up.frozen,
    }
    print(f"ftsup standby: warm in {ready['ready_s']:.2f} s; waiting", flush=True)
    # Activated while warming: the shim has sent the attempt and closed its end.
    with contextlib.suppress(OSError):
        control.send(json.dumps(ready).encode())
    activation = wait_for_attempt(control)
    control.close()
    if activation is None:
        return 0
    os.environ.clear()
    os.environ.update(activation["env"])
    move_to(activation.get("cwd"))
    idle = raise_leftovers()
    print(f"ftsup standby: taking over as attempt {os.environ.get(ENV_ATTEMPT)}", flush=True)
    if idle:
        names = ", ".join(idle)
        print(f"ftsup standby: threads started by the warm-up stay idle: {names}", flush=True)
    from ftsup.trainer import run

    return run.main(activation["args"], prepared=prepared)


if __name__ == "__main__":
    sys.exit(main())
