"""Finders for the error lines that torch, NCCL, CUDA and Python print.

Each finder takes the (prefix-stripped) lines of a log tail and returns a short
reason or a parsed record, or None. They are separate from the classifier so
that each pattern can be read, and tested, next to the text it matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# torchrun (and `--tee`) prefix each rank's lines: "[rank3]: ", "[default0]:".
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
_MAX_REASON = 300


@dataclass(frozen=True)
class Line:
    text: str
    rank: int | None


def split_lines(log_tail: str) -> list[Line]:
    """Lines with torchrun's rank prefix removed (and remembered)."""
    lines = []
    for raw in log_tail.splitlines():
        raw = raw.rstrip()
        match = _RANK_PREFIX.match(raw)
        if match:
            lines.append(Line(raw[match.end() :], int(match.group(1))))
        else:
            lines.append(Line(raw, None))
    return lines


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


# --- CUDA out of memory -------------------------------------------------------

_OOM_NEW = re.compile(
    r"CUDA out of memory\. Tried to allocate ([\d.]+ [KMGT]?i?B)\. GPU (\d+) has a total "
    r"capac(?:i)?ty of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free"
)
_OOM_OLD = re.compile(
    r"CUDA out of memory\. Tried to allocate ([\d.]+ [KMGT]?i?B) \(GPU (\d+); "
    r"([\d.]+ [KMGT]?i?B) total capacity;.*?([\d.]+ [KMGT]?i?B) free"
)
_OOM_OTHER = re.compile(r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")


def find_cuda_oom(lines: list[Line]) -> str | None:
    """torch's allocator message (new and pre-2.2 wording), or cuBLAS/CUDA's."""
    for line in reversed(lines):
        for pattern in (_OOM_NEW, _OOM_OLD):
            match = pattern.search(line.text)
            if match:
                size, gpu, total, free = match.groups()
                where = f"GPU {gpu}" + (f", rank {line.rank}" if line.rank is not None else "")
                return (
                    f"CUDA out of memory: tried to allocate {size} on {where} "
                    f"({total} total, {free} free)"
                )
        match = _OOM_OTHER.search(line.text)
        if match:
            return f"CUDA out of memory ({match.group(0)})"
    return None


# --- CUDA / driver errors ---------------------------------------------------------

_CUDA_ERROR = re.compile(
    r"(CUDA (?:driver )?error: [^\n]+)|\b(CUDA_ERROR_[A-Z_]+)\b"
    r"|\b(CUBLAS_STATUS_(?!ALLOC_FAILED)[A-Z_]+)\b|(cuDNN error: [A-Z_]+)"
)
_XID = re.compile(r"\bXid \(PCI:[0-9a-fA-F:.]+\): (\d+)|\bXID[ :]+(\d+)\b", re.IGNORECASE)


def find_cuda_error(lines: list[Line]) -> str | None:
    """The last CUDA/driver error line ("CUDA error: an illegal memory access ...")."""
    for line in reversed(lines):
        match = _CUDA_ERROR.search(line.text)
        if match:
            return clip(next(group for group in match.groups() if group).rstrip("."))
    return None


def find_xids(lines: list[Line]) -> list[int]:
    """XIDs named in the text (a kernel "NVRM: Xid (PCI:...): 79, ..." line or "XID 79")."""
    found = []
    for line in lines:
        for match in _XID.finditer(line.text):
            found.append(int(match.group(1) or match.group(2)))
    return found


# --- NCCL and torch.distributed ---------------------------------------------------------

_NCCL_TIMEOUT = re.compile(
    r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+)"
    r".*?Timeout\(ms\)=(\d+)\) ran for (\d+) milliseconds"
)
_NCCL_ERROR = re.compile(
    r"NCCL error in: [^,]+, (.+?)(?: \(run with NCCL_DEBUG=INFO for details\))?"
    r"(?:, NCCL version ([\d.]+\S*))?\s*$"
)
_NCCL_ASYNC = re.compile(r"NCCL error: (.+?)(?: \(run with NCCL_DEBUG=INFO for details\))?,")
_NCCL_OTHER = re.compile(
    r"NCCL communicator was aborted|Some NCCL operations have failed or timed out"
    r"|ncclInternalError|ncclUnhandledCudaError|ncclSystemError|ncclRemoteError"
)


def find_nccl(lines: list[Line]) -> str | None:
    """An NCCL watchdog timeout, or an "NCCL error in: ..." with NCCL's "Last error"."""
    for line in lines:
        match = _NCCL_TIMEOUT.search(line.text)
        if match:
            seq, op, limit, ran = match.groups()
            return f"NCCL timeout: {op} (SeqNum={seq}) ran {ran} ms, timeout {limit} ms"
    for index in range(len(lines) - 1, -1, -1):
        text = lines[index].text
        match = _NCCL_ERROR.search(text) or _NCCL_ASYNC.search(text)
        if match:
            reason = f"NCCL error: {match.group(1)}"
            version = match.group(2) if match.re is _NCCL_ERROR else None
            if version:
                reason += f" (NCCL {version})"
            last = _nccl_last_error(lines[index + 1 : index + 8])
            return clip(reason + (f"; last error: {last}" if last else ""))
    for line in reversed(lines):
        match = _NCCL_OTHER.search(line.text)
        if match:
            return clip(f"NCCL failure: {line.text.strip()}")
    return None


def _nccl_last_error(following: list[Line]) -> str | None:
    """NCCL prints "Last error:" then the cause on the next line."""
    for offset, line in enumerate(following):
        if line.text.strip().startswith("Last error:"):
            rest = line.text.split("Last error:", 1)[1].strip()
            if rest:
                return rest
            for after in following[offset + 1 :]:
                if after.text.strip():
                    return after.text.strip()
    return None


# --- Python tracebacks ------------------------------------------------------------------

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
_EXCEPTION = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure))(?::\s?(?P<msg>.*))?$"
)
CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


@dataclass(frozen=True)
class PyException:
    type: str
    line: str
    rank: int | None


def find_exceptions(lines: list[Line]) -> list[PyException]:
    """The final line of every traceback in the tail, in order."""
    found = []
    in_traceback = False
    for line in lines:
        if _TRACEBACK.search(line.text):
            in_traceback = True
            continue
        if not in_traceback:
            continue
        match = _EXCEPTION.match(line.text)
        if match:
            found.append(PyException(match.group("type"), clip(line.text), line.rank))
            in_traceback = False
    return found


def is_distributed_exception(exc: PyException) -> bool:
    """torch.distributed's own errors (store, rendezvous, backend), not the launcher's."""
    if exc.type == CHILD_FAILED:
        return False
    short = exc.type.rsplit(".", 1)[-1]
    return exc.type.startswith("torch.distributed.") or short.startswith("Dist")


# --- torchrun's ChildFailedError summary ----------------------------------------------------


@dataclass(frozen=True)
class RootCause:
    rank: int | None
    exitcode: int | None
    pid: int | None
    signal_name: str | None


_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)(?: \(pid: (\d+)\))?")
_ROOT_SIGNAL = re.compile(r"Signal \d+ \((SIG\w+)\) received by PID")


def find_root_cause(lines: list[Line]) -> RootCause | None:
    """torchrun's "Root Cause (first observed failure)" block."""
    start = None
    for index, line in enumerate(lines):
        if line.text.startswith("Root Cause (first observed failure)"):
            start = index
    if start is None:
        return None
    rank = exitcode = pid = None
    signal_name = None
    for line in lines[start + 1 : start + 12]:
        if match := _ROOT_RANK.match(line.text):
            rank = int(match.group(1))
        elif match := _ROOT_EXIT.match(line.text):
            exitcode = int(match.group(1))
            pid = int(match.group(2)) if match.group(2) else None
        elif match := _ROOT_SIGNAL.search(line.text):
            signal_name = match.group(1)
        if line.text.startswith("====="):
            break
    return RootCause(rank, exitcode, pid, signal_name)


# --- segmentation faults and kills ------------------------------------------------------

_SEGV = re.compile(r"Segmentation fault|SIGSEGV")
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+) in (\S+)')


def find_segfault(lines: list[Line]) -> str | None:
    """faulthandler's "Fatal Python error: Segmentation fault" (+ the frame), or the shell's."""
    for index, line in enumerate(lines):
        if "Fatal Python error: Segmentation fault" in line.text:
            frame = _innermost_frame(lines[index + 1 :])
            return "segmentation fault" + (f" in {frame}" if frame else "")
    for line in reversed(lines):
        if _SEGV.search(line.text):
            return "segmentation fault"
    return None


def _innermost_frame(lines: list[Line]) -> str | None:
    """faulthandler lists the current thread's frames innermost first."""
    current = False
    for line in lines:
        if line.text.startswith("Current thread"):
            current = True
            continue
        if current:
            match = _FRAME.match(line.text)
            if match:
                path, number, func = match.groups()
                return f"{func} ({path.rsplit('/', 1)[-1]}:{number})"
    return None


# The shell's report of a child killed by SIGKILL ("Killed", or
# "/bin/bash: line 1: 4821 Killed   python train.py"), and the kernel's wording.
_KILLED_LINE = re.compile(r"^(?:Killed|.*\d+ Killed\s+.*)$")
_KERNEL_OOM = re.compile(r"Out of memory: Killed process|oom-kill:|invoked oom-killer")


def find_kill_evidence(lines: list[Line]) -> str | None:
    for line in reversed(lines):
        if _KERNEL_OOM.search(line.text):
            return clip(line.text.strip())
        if _KILLED_LINE.match(line.text.strip()):
            return "'Killed' in the log"
    return None


_WORKER_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: Killed")


def find_worker_killed(lines: list[Line]) -> str | None:
    """torch's DataLoader reports a worker that died of SIGKILL (the OOM killer's signal)."""
    for line in reversed(lines):
        match = _WORKER_KILLED.search(line.text)
        if match:
            return f"DataLoader worker (pid {match.group(1)}) killed by SIGKILL"
    return None


def find_error_line(lines: list[Line]) -> str | None:
    """The last "error: ..." line (argparse and ftsup's trainer report bad input this way)."""
    for line in reversed(lines):
        lowered = line.text.lower()
        if "error:" in lowered or lowered.startswith("error"):
            return clip(line.text.strip())
    return None
