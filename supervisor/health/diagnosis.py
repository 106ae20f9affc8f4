"""Why did an attempt end? One class and one line, from its exit and its log tail.

The class drives the restart policy (configuration errors are never retried, a
user's kill is respected) and the line is what `status`, `events`, the TUI and
notifications show. The log is richer than the exit status (torchrun turns a
rank's SIGKILL into exit 1), so known error text wins over the bare status;
only ftsup's own knowledge (it killed a hung run, or a user asked) wins over both.
"""

from __future__ import annotations

import signal as signals
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ftsup.supervisor.contract import EXIT_CONFIG, EXIT_STOPPED
from ftsup.supervisor.health import logscan
from ftsup.supervisor.health.oom import read_oom_record
from ftsup.supervisor.health.xid import XidPolicy
from ftsup.supervisor.health.xid import describe as describe_xid

__all__ = [
    "KILLED_BY_HANG",
    "KILLED_BY_USER",
    "Diagnosis",
    "FailureKind",
    "classify_failure",
    "read_oom_record",
]

KILLED_BY_USER = "user"
KILLED_BY_HANG = "ftsup-hang"
_TAIL_LINES = 400
_POLICY = XidPolicy()
_LIKELY_OOM = "most likely the host OOM killer"


class FailureKind(StrEnum):
    FINISHED = "finished"
    CONFIG_ERROR = "config_error"
    STOPPED = "stopped"
    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"
    NCCL = "nccl"
    CUDA_ERROR = "cuda_error"
    PYTHON_EXCEPTION = "python_exception"
    SEGFAULT = "segfault"
    KILLED = "killed"
    HANG = "hang"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Diagnosis:
    kind: FailureKind
    reason: str
    retry: bool
    xid: int | None = None


def classify_failure(
    exit_code: int | None,
    signal: int | None,
    log_tail: str,
    *,
    killed_by: str | None = None,
    oom_record: str | None = None,
    gpu_xids: Sequence[int] = (),
) -> Diagnosis:
    """Classify an ended attempt.

    `signal` is the signal that ended the trainer (None if it exited); an exit
    code above 128 or below 0 is read as a signal too (shells and `subprocess`
    report them so). `killed_by` is who ftsup knows sent the kill: "user", or
    "ftsup-<why>" ("ftsup-hang" for a hang). `gpu_xids` are XIDs the GPU monitor
    saw on the run's GPUs during the attempt.
    """
    sig = _effective_signal(exit_code, signal)
    lines = logscan.split_lines(_tail(log_tail))
    code = _launcher_exit_code(exit_code, sig, lines)
    if killed_by == KILLED_BY_HANG:
        reason = "hung: no progress within the hang timeout, killed by ftsup"
        return Diagnosis(FailureKind.HANG, reason, True)
    if sig is None and code == 0:
        return Diagnosis(FailureKind.FINISHED, "finished", False)
    if sig is None and code == EXIT_CONFIG:
        line = logscan.find_error_line(lines)
        reason = line or "bad configuration or data (exit 2)"
        return Diagnosis(FailureKind.CONFIG_ERROR, reason, False)
    if sig is None and code == EXIT_STOPPED:
        reason = "stopped on request after saving a checkpoint (exit 75)"
        return Diagnosis(FailureKind.STOPPED, reason, False)
    if killed_by is not None:
        who = "a user" if killed_by == KILLED_BY_USER else f"ftsup ({killed_by})"
        how = f" with {_signal_name(sig)}" if sig is not None else ""
        return Diagnosis(FailureKind.KILLED, f"killed by {who}{how}", killed_by != KILLED_BY_USER)
    return _from_log(exit_code, sig, lines, oom_record, gpu_xids)


def _launcher_exit_code(
    exit_code: int | None, sig: int | None, lines: list[logscan.Line]
) -> int | None:
    """torchrun exits 1 whatever its rank did; its summary keeps the rank's 2 or 75."""
    if sig is None and exit_code == 1:
        root = logscan.find_root_cause(lines)
        if root is not None and root.exitcode in (EXIT_CONFIG, EXIT_STOPPED):
            return root.exitcode
    return exit_code


def _from_log(
    exit_code: int | None,
    sig: int | None,
    lines: list[logscan.Line],
    oom_record: str | None,
    gpu_xids: Sequence[int],
) -> Diagnosis:
    if reason := logscan.find_cuda_oom(lines):
        return Diagnosis(FailureKind.CUDA_OOM, reason, True)
    xid = _worst_xid([*gpu_xids, *logscan.find_xids(lines)])
    if reason := logscan.find_cuda_error(lines):
        return Diagnosis(FailureKind.CUDA_ERROR, _with_xid(reason, xid), True, xid)
    if reason := logscan.find_nccl(lines):
        return Diagnosis(FailureKind.NCCL, reason, True)
    root = logscan.find_root_cause(lines)
    exception = _main_exception(lines, root)
    if exception is not None and logscan.is_distributed_exception(exception):
        return Diagnosis(FailureKind.NCCL, exception.line, True)
    segfault = logscan.find_segfault(lines)
    if sig == signals.SIGSEGV or (root and root.signal_name == "SIGSEGV"):
        segfault = (segfault or "segmentation fault").replace(
            "segmentation fault", "segmentation fault (SIGSEGV)", 1
        )
    if segfault:
        return Diagnosis(FailureKind.SEGFAULT, segfault, True)
    if reason := logscan.find_worker_killed(lines):
        return Diagnosis(FailureKind.HOST_OOM, f"{reason}: {_LIKELY_OOM}", True)
    if exception is not None:
        return Diagnosis(FailureKind.PYTHON_EXCEPTION, exception.line, True)
    if xid is not None:
        return Diagnosis(FailureKind.CUDA_ERROR, f"GPU error: {describe_xid(xid)}", True, xid)
    return _from_status(exit_code, sig, lines, root, oom_record)


def _from_status(
    exit_code: int | None,
    sig: int | None,
    lines: list[logscan.Line],
    root: logscan.RootCause | None,
    oom_record: str | None,
) -> Diagnosis:
    who = ""
    if root is not None and root.signal_name is not None:
        sig = _signal_number(root.signal_name) or sig
        who = f"rank {root.rank} " if root.rank is not None else ""
    if sig == signals.SIGKILL:
        if oom_record:
            reason = f"{who}killed by the host OOM killer ({oom_record})"
            return Diagnosis(FailureKind.HOST_OOM, reason, True)
        if evidence := logscan.find_kill_evidence(lines):
            reason = f"{who}killed by SIGKILL, not sent by ftsup ({evidence}): {_LIKELY_OOM}"
            return Diagnosis(FailureKind.HOST_OOM, reason, True)
        reason = f"{who}killed by SIGKILL from outside ftsup (no OOM record found)"
        return Diagnosis(FailureKind.KILLED, reason, True)
    if sig is not None:
        reason = f"{who}killed by {_signal_name(sig)} from outside ftsup"
        return Diagnosis(FailureKind.KILLED, reason, True)
    if root is not None and root.exitcode is not None:
        rank = f"rank {root.rank} " if root.rank is not None else "a rank "
        reason = f"{rank}exited with code {root.exitcode} (torchrun)"
        return Diagnosis(FailureKind.UNKNOWN, reason, True)
    code = "no exit status" if exit_code is None else f"exit code {exit_code}"
    return Diagnosis(FailureKind.UNKNOWN, f"{code}; no known error in the log tail", True)


def _main_exception(
    lines: list[logscan.Line], root: logscan.RootCause | None
) -> logscan.PyException | None:
    """The last traceback's exception: of torchrun's root-cause rank if known, never torchrun's."""
    found = [e for e in logscan.find_exceptions(lines) if e.type != logscan.CHILD_FAILED]
    if root is not None and root.rank is not None:
        of_rank = [e for e in found if e.rank == root.rank]
        found = of_rank or found
    return found[-1] if found else None


def _effective_signal(exit_code: int | None, sig: int | None) -> int | None:
    if sig is not None:
        return sig
    if exit_code is not None and exit_code < 0:
        return -exit_code
    if exit_code is not None and 128 < exit_code <= 128 + 64:
        return exit_code - 128
    return None


def _signal_name(sig: int) -> str:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _signal_number(name: str) -> int | None:
    member = getattr(signals, name, None)
    return int(member) if isinstance(member, signals.Signals) else None


def _worst_xid(xids: Sequence[int]) -> int | None:
    """The XID whose default action is most severe (stop > restart > warn), latest first."""
    severity = {"stop": 2, "restart": 1, "warn": 0}
    best = None
    for xid in xids:
        if best is None or severity[_POLICY.action(xid)] >= severity[_POLICY.action(best)]:
            best = xid
    return best


def _with_xid(reason: str, xid: int | None) -> str:
    return reason if xid is None else f"{reason} ({describe_xid(xid)})"


def _tail(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(lines[-_TAIL_LINES:])
