"""`python -m ftsup.trainer.distrun <torchrun arguments>`: torchrun that keeps ftsup's contract.

Runs `torch.distributed.run` in this process (the workers are its children)
and adds what the supervisor relies on:

* exit codes: 75 when the workers stopped on request, 2 for a configuration
  error, instead of torchrun's 1 for any worker failure;
* signals: SIGTERM/SIGUSR1/SIGUSR2 are forwarded to the workers, which act at
  the next step boundary (torchrun would kill them after 30 s on SIGTERM, and
  die itself on SIGUSR1/SIGUSR2);
* SIGKILL: workers run in their own sessions, so each worker asks the kernel
  to kill it when this launcher dies (`ftsup.trainer.dist.die_with_parent`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from ftsup.supervisor.contract import EXIT_CONFIG, EXIT_STOPPED, PROGRESS_RENDEZVOUS
from ftsup.supervisor.procinfo import child_pids

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# torchrun's own handlers, minus SIGTERM, which must not tear the workers down.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def forward(signum: int, _frame: FrameType | None) -> None:
    """Signal handler: the same signal to each child (torchrun's workers)."""
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def exit_code_for(first: int, others: Sequence[int] = ()) -> int:
    """One exit code for the job from the failed workers' codes (`first` failed first).

    When a worker exits, torchrun SIGTERMs the others; one that is already
    past its last barrier may die of it during interpreter shutdown, killed or,
    with gloo's threads half torn down, aborted ("terminate called without an
    active exception": SIGABRT; seen under CI load). A stop's checkpoint is
    complete on every rank before any rank exits (the save ends with a barrier),
    so a stop (75) is judged by the first worker to exit, and SIGTERM, SIGKILL
    and SIGABRT deaths after it are collateral.
    """
    codes = [first, *others]
    if EXIT_CONFIG in codes:
        return EXIT_CONFIG
    collateral = {
        EXIT_STOPPED,
        -int(signal.SIGTERM),
        -int(signal.SIGKILL),
        -int(signal.SIGABRT),
    }
    if first == EXIT_STOPPED and all(code in collateral for code in others):
        return EXIT_STOPPED
    failures = [code for code in codes if code > 0 and code != EXIT_STOPPED]
    return failures[0] if failures else 1


def announce_rendezvous(args: Any) -> None:
    """Tell the daemon this launcher now waits for the job's other nodes (a
    multi-node run): until a trainer reports `joined`, a missing node is what
    the run waits for, not a hang."""
    if str(args.nnodes) in ("1", "1:1") or args.rdzv_backend == "static" or args.standalone:
        return
    from ftsup.trainer.progress import ProgressWriter

    writer = ProgressWriter.from_env()
    writer.emit(
        PROGRESS_RENDEZVOUS,
        state="waiting",
        nnodes=str(args.nnodes),
        endpoint=str(args.rdzv_endpoint),
        rdzv_id=str(args.rdzv_id),
    )
    writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for sig in FORWARDED:
        signal.signal(sig, forward)
    launcher: Any = torchrun
    args = launcher.parse_args([f"--signals-to-handle={TORCHRUN_SIGNALS}", *(argv or sys.argv[1:])])
    announce_rendezvous(args)
    try:
        launcher.run(args)
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        others = [f.exitcode for rank, f in exc.failures.items() if rank != first_rank]
        return exit_code_for(first.exitcode, others)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
