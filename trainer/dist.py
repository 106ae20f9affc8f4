"""The few torch.distributed calls the trainer needs, harmless when not distributed.

Ranks must agree on every decision that leads to a collective (a checkpoint
save includes barriers), and a signal reaches each rank at a slightly
different moment; so requests are combined with an all-reduce at each step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def _dist() -> object | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def world_size() -> int:
    """Processes in the job, from the launcher's environment (before init too)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """The process's rank on its node (equal to `rank` on one node)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()  # type: ignore[attr-defined]


def end_rank(code: int, *, wait_for_threads: bool = True) -> None:
    """A rank of a multi-process run ends here, with `code`, once training is over
    (finished or stopped on request): Python threads are waited for and atexit
    handlers run as at a normal exit, the streams are flushed, then `os._exit`.
    Returns at once in a single process. `wait_for_threads=False` for a script
    of someone else's that stopped: the code after its `train()`, which would
    have ended its own threads, does not run, so waiting could hang it.

    Not the interpreter's own teardown: while C++ static objects are destroyed, a
    thread of the distributed stack can abort the process (SIGABRT, "terminate
    called without an active exception"), after a stop (exit 75) and after a
    finished run (exit 0) alike, with or without `destroy_process_group` first
    (seen under CI load with gloo and with DeepSpeed). torchrun then reports the
    abort, and a run that ended well counts as failed. Nothing is left to do: the
    last save ended with a barrier, and the kernel closes the sockets.
    """
    if _dist() is None:
        return
    if wait_for_threads:  # what interpreter exit does first
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (unchanged in a single process)."""
    dist = _dist()
    if dist is None:
        return flags
    import torch

    device = "cpu"
    if dist.get_backend() == "nccl":  # type: ignore[attr-defined]
        device = f"cuda:{torch.cuda.current_device()}"
    tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # type: ignore[attr-defined]
    return tuple(bool(value) for value in tensor.tolist())


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its launcher dies.

    torchrun starts each worker in a new session, so a SIGKILL to the
    launcher's process group (the supervisor's last resort) would otherwise
    leave the workers training, and writing checkpoints, on their own.
    """
    import ctypes
    import signal

    if not os.path.exists("/proc/self"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
