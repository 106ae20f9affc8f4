"""Failure classes from real log tails (tests/health/logs) and real exit statuses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftsup.supervisor.health.diagnosis import (
    KILLED_BY_HANG,
    KILLED_BY_USER,
    FailureKind,
    classify_failure,
)

LOGS = Path(__file__).parent / "logs"
K = FailureKind

# log file, exit code, signal, extra keywords, expected kind, expected reason
CORPUS: list[tuple[str, int | None, int | None, dict[str, object], FailureKind, str]] = [
    (
        "cuda_oom_hf_trainer",
        1,
        None,
        {},
        K.CUDA_OOM,
        "CUDA out of memory: tried to allocate 2.32 GiB on GPU 0 (79.19 GiB total, 1.07 GiB free)",
    ),
    (
        "cuda_oom_torch1",
        1,
        None,
        {},
        K.CUDA_OOM,
        "CUDA out of memory: tried to allocate 64.00 MiB on GPU 0 "
        "(23.69 GiB total, 41.06 MiB free)",
    ),
    (
        "cuda_oom_torchrun_rank1",
        1,
        None,
        {},
        K.CUDA_OOM,
        "CUDA out of memory: tried to allocate 1.16 GiB on GPU 1, rank 1 "
        "(39.38 GiB total, 598.38 MiB free)",
    ),
    (
        "nccl_watchdog_timeout",
        1,
        None,
        {},
        K.NCCL,
        "NCCL timeout: ALLREDUCE (SeqNum=48211) ran 600047 ms, timeout 600000 ms",
    ),
    (
        "nccl_timeout_torch113",
        None,
        signal.SIGABRT,
        {},
        K.NCCL,
        "NCCL timeout: ALLREDUCE (SeqNum=469508) ran 1802212 ms, timeout 1800000 ms",
    ),
    (
        "nccl_system_error",
        1,
        None,
        {},
        K.NCCL,
        "NCCL error: unhandled system error (NCCL 2.18.6); last error: socketStartConnect: "
        "Connect to 10.20.3.14<45613> failed : No route to host",
    ),
    (
        "nccl_remote_error",
        1,
        None,
        {},
        K.NCCL,
        "NCCL error: remote process exited or there was a network error (NCCL 2.19.3); last error: "
        "NET/IB : Got completion from peer 10.1.4.22<50217> with error 12, opcode 32753, len 0, "
        "vendor err 129 (Recv) localGid ::ffff:10.1.4.21 remoteGid ::ffff:10.1.4.22",
    ),
    (
        "dist_store_error",
        1,
        None,
        {},
        K.NCCL,
        "torch.distributed.DistNetworkError: The client socket has timed out after 900000ms "
        "while trying to connect to (node-a, 29500).",
    ),
    (
        "cuda_illegal_address",
        1,
        None,
        {},
        K.CUDA_ERROR,
        "CUDA error: an illegal memory access was encountered",
    ),
    (
        "cuda_error_in_nccl_watchdog",
        None,
        signal.SIGABRT,
        {},
        K.CUDA_ERROR,
        "CUDA error: an illegal memory access was encountered",
    ),
    (
        "cuda_launch_failure_xid",
        1,
        None,
        {"gpu_xids": (79,)},
        K.CUDA_ERROR,
        "CUDA error: unspecified launch failure (XID 79: GPU has fallen off the bus)",
    ),
    (
        "cuda_ecc_with_nvrm",
        1,
        None,
        {},
        K.CUDA_ERROR,
        "CUDA error: uncorrectable ECC error encountered (XID 48: Double Bit ECC Error)",
    ),
    (
        "cuda_device_assert",
        1,
        None,
        {},
        K.CUDA_ERROR,
        "CUDA error: device-side assert triggered",
    ),
    (
        "python_valueerror_pad_token",
        1,
        None,
        {},
        K.PYTHON_EXCEPTION,
        "ValueError: Asking to pad but the tokenizer does not have a padding token. Please select "
        "a token to use as `pad_token` `(tokenizer.pad_token = tokenizer.eos_token e.g.)` or add a "
        "new pad token via `tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.",
    ),
    (
        "python_chained_oserror",
        1,
        None,
        {},
        K.PYTHON_EXCEPTION,
        "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
        "find them in the cached files.",
    ),
    (
        "rich_traceback_keyerror",
        1,
        None,
        {},
        K.PYTHON_EXCEPTION,
        "KeyError: 'messages'",
    ),
    (
        # The root-cause rank's exception, not rank 1's consequence nor torchrun's own.
        "torchrun_child_python_error",
        1,
        None,
        {},
        K.PYTHON_EXCEPTION,
        "RuntimeError: Expected all tensors to be on the same device, but found at least two "
        "devices, cuda:0 and cpu! (when checking argument for argument index in method "
        "wrapper_CUDA__index_select)",
    ),
    (
        "torchrun_sigkill",
        1,
        None,
        {},
        K.KILLED,
        "rank 0 killed by SIGKILL from outside ftsup (no OOM record found)",
    ),
    (
        "torchrun_sigkill",
        1,
        None,
        {"oom_record": "kernel: Out of memory: Killed process 14750 (python3)"},
        K.HOST_OOM,
        "rank 0 killed by the host OOM killer "
        "(kernel: Out of memory: Killed process 14750 (python3))",
    ),
    (
        "shell_killed",
        137,
        None,
        {},
        K.HOST_OOM,
        "killed by SIGKILL, not sent by ftsup ('Killed' in the log): "
        "most likely the host OOM killer",
    ),
    (
        "dataloader_worker_killed",
        1,
        None,
        {},
        K.HOST_OOM,
        "DataLoader worker (pid 91827) killed by SIGKILL: most likely the host OOM killer",
    ),
    (
        "segfault_faulthandler",
        None,
        signal.SIGSEGV,
        {},
        K.SEGFAULT,
        "segmentation fault (SIGSEGV) in _flash_attn_forward (flash_attn_interface.py:96)",
    ),
    ("segfault_core_dumped", 139, None, {}, K.SEGFAULT, "segmentation fault (SIGSEGV)"),
    (
        "config_error_exit2",
        2,
        None,
        {},
        K.CONFIG_ERROR,
        'ftsup-trainer: error: data/sft.jsonl line 17: record has no "output" field '
        "(format alpaca expects instruction, input, output)",
    ),
    (
        "argparse_error_exit2",
        2,
        None,
        {},
        K.CONFIG_ERROR,
        "train.py: error: unrecognized arguments: --learning-rate 2e-5",
    ),
    ("no_error", 1, None, {}, K.UNKNOWN, "exit code 1; no known error in the log tail"),
]


@pytest.mark.parametrize(
    ("log", "code", "sig", "extra", "kind", "reason"),
    CORPUS,
    ids=[f"{case[0]}-{case[4]}" for case in CORPUS],
)
def test_corpus(
    log: str,
    code: int | None,
    sig: int | None,
    extra: dict[str, object],
    kind: FailureKind,
    reason: str,
) -> None:
    text = (LOGS / f"{log}.log").read_text()
    diagnosis = classify_failure(code, sig, text, **extra)  # type: ignore[arg-type]
    assert (diagnosis.kind, diagnosis.reason) == (kind, reason)
    assert diagnosis.retry is (kind not in (K.CONFIG_ERROR,))


def test_every_log_in_the_corpus_is_tested() -> None:
    assert {p.stem for p in LOGS.glob("*.log")} == {case[0] for case in CORPUS}


def test_xid_is_reported() -> None:
    text = (LOGS / "cuda_ecc_with_nvrm.log").read_text()
    assert classify_failure(1, None, text).xid == 48


@pytest.mark.parametrize(
    ("code", "sig", "killed_by", "kind", "reason", "retry"),
    [
        (0, None, None, K.FINISHED, "finished", False),
        (
            75,
            None,
            None,
            K.STOPPED,
            "stopped on request after saving a checkpoint (exit 75)",
            False,
        ),
        (2, None, None, K.CONFIG_ERROR, "bad configuration or data (exit 2)", False),
        (None, signal.SIGTERM, KILLED_BY_USER, K.KILLED, "killed by a user with SIGTERM", False),
        (-9, None, KILLED_BY_USER, K.KILLED, "killed by a user with SIGKILL", False),
        (
            None,
            signal.SIGKILL,
            "ftsup-gpu",
            K.KILLED,
            "killed by ftsup (ftsup-gpu) with SIGKILL",
            True,
        ),
        (
            None,
            signal.SIGKILL,
            KILLED_BY_HANG,
            K.HANG,
            "hung: no progress within the hang timeout, killed by ftsup",
            True,
        ),
        (143, None, None, K.KILLED, "killed by SIGTERM from outside ftsup", True),
        (
            None,
            signal.SIGKILL,
            None,
            K.KILLED,
            "killed by SIGKILL from outside ftsup (no OOM record found)",
            True,
        ),
        (None, None, None, K.UNKNOWN, "no exit status; no known error in the log tail", True),
    ],
)
def test_statuses_without_log(
    code: int | None,
    sig: int | None,
    killed_by: str | None,
    kind: FailureKind,
    reason: str,
    retry: bool,
) -> None:
    diagnosis = classify_failure(code, sig, "", killed_by=killed_by)
    assert (diagnosis.kind, diagnosis.reason, diagnosis.retry) == (kind, reason, retry)


def test_torchrun_keeps_the_ranks_config_error() -> None:
    text = (
        (LOGS / "torchrun_sigkill.log")
        .read_text()
        .replace("exitcode  : -9 (pid: 14750)", "exitcode  : 2 (pid: 14750)")
        .replace("Signal 9 (SIGKILL) received by PID 14750", "To enable traceback see: ...")
    )
    assert classify_failure(1, None, text).kind is K.CONFIG_ERROR


def _run(code: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    log = tmp_path / "stdout.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
    return done, log.read_text()


def _split(returncode: int) -> tuple[int | None, int | None]:
    return (None, -returncode) if returncode < 0 else (returncode, None)


def test_real_python_exception(tmp_path: Path) -> None:
    done, text = _run(
        "def load():\n    raise FileNotFoundError('no such dataset: data/x.jsonl')\nload()",
        tmp_path,
    )
    diagnosis = classify_failure(*_split(done.returncode), text)
    assert (diagnosis.kind, diagnosis.reason) == (
        K.PYTHON_EXCEPTION,
        "FileNotFoundError: no such dataset: data/x.jsonl",
    )


def test_real_segfault(tmp_path: Path) -> None:
    done, text = _run("import ctypes\nctypes.string_at(0)", tmp_path)
    assert done.returncode == -signal.SIGSEGV
    diagnosis = classify_failure(*_split(done.returncode), text)
    assert diagnosis.kind is K.SEGFAULT
    assert diagnosis.reason.startswith("segmentation fault (SIGSEGV) in string_at")


def test_real_sigkill_without_evidence(tmp_path: Path) -> None:
    code = "import os, signal\nprint('step 1', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    done, text = _run(code, tmp_path)
    diagnosis = classify_failure(*_split(done.returncode), text)
    assert diagnosis.kind is K.KILLED
    assert "SIGKILL" in diagnosis.reason
