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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _Forwarded:
    """Whether this launcher passed a stop request on to its workers."""

    stop = False


FORWARDED_STOP = _Forwarded()


def forward(signum: int, _frame: FrameType | None) -> None:
    """Signal handler: the same signal to each child (torchrun's workers)."""
    if signum in STOP_SIGNALS:
        FORWARDED_STOP.stop = True
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def exit_code_for(first: int, others: Sequence[int] = (), *, stop_forwarded: bool = False) -> int:
    """One exit code for the job from the failed workers' codes (`first` failed first).

    When a worker exits, torchrun SIGTERMs the others; one that is already
    past its last barrier may die of it during interpreter shutdown, killed or,
    with gloo's threads half torn down, aborted ("terminate called without an
    active exception": SIGABRT; seen under CI load). A stop's checkpoint is
    complete on every rank before any rank exits (the save ends with a barrier),
    so a stop (75) is judged by the first worker to exit, and SIGTERM, SIGKILL
    and SIGABRT deaths after it are collateral.

    torchrun's "first" is only to the second (a failure without an error file
    is stamped `int(time.time())`, ties go to the lowest rank), so a rank killed
    in the same second as another's 75 can come first. When this launcher
    forwarded a stop (`stop_forwarded`), any 75 with only collateral deaths
    beside it is the stop; without one, the order is all there is to go by.
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
    if stop_forwarded and EXIT_STOPPED in codes and all(code in collateral for code in codes):
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
        return exit_code_for(first.exitcode, others, stop_forwarded=FORWARDED_STOP.stop)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
