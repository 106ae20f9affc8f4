"""Stack capture from real Python processes: py-spy where it runs, faulthandler otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.supervisor.health.stacks import (
    STACK_DUMP_SIGNAL,
    capture_stacks,
    catches_signal,
)
from tests.requirements import require_py_spy_attaches, require_tool

TRAINER = """\
import faulthandler, signal, sys, time
if {register}:
    faulthandler.register(signal.SIGRTMIN + 2, file=sys.stderr, all_threads=True)

def wait_for_collective():
    print("ready", flush=True)
    time.sleep(600)

wait_for_collective()
"""


class Trainer:
    def __init__(self, tmp_path: Path, *, register: bool) -> None:
        script = tmp_path / "trainer.py"
        script.write_text(TRAINER.format(register=register))
        self.log = tmp_path / "stdout.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT
            )
        self.wait_for("ready")

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log.read_text()
            if text in content:
                return content
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log: {self.log.read_text()!r}")

    def stop(self) -> None:
        """SIGSTOP, and wait until the kernel shows it stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        for _ in range(200):
            if stat.read_text().rsplit(")", 1)[-1].split()[0] == "T":
                return
            time.sleep(0.01)
        raise AssertionError("the trainer did not stop")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Trainer]:
    process = Trainer(tmp_path, register=True)
    yield process
    process.close()


def test_auto_uses_py_spy_where_it_attaches(trainer: Trainer, tmp_path: Path) -> None:
    require_py_spy_attaches(trainer.proc.pid)
    out = tmp_path / "attempt-1" / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=30)
    assert summary == f"py-spy stacks of pid {trainer.proc.pid} in {out}"
    assert "wait_for_collective (trainer.py:7)" in out.read_text()
    assert trainer.proc.poll() is None  # capturing never kills


def test_auto_falls_back_to_faulthandler_without_py_spy(
    trainer: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no py-spy to be found
    out = tmp_path / "attempt-1" / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=30)
    assert "stacks written to the log by faulthandler" in summary
    assert "in wait_for_collective" in trainer.wait_for("in wait_for_collective")
    assert trainer.proc.poll() is None  # capturing never kills


def test_py_spy(trainer: Trainer, tmp_path: Path) -> None:
    require_py_spy_attaches(trainer.proc.pid)
    out = tmp_path / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=30, tool="py-spy")
    assert summary == f"py-spy stacks of pid {trainer.proc.pid} in {out}"
    text = out.read_text()
    assert f"== pid {trainer.proc.pid}: py-spy dump ==" in text
    assert "wait_for_collective (trainer.py:7)" in text


def test_py_spy_alone_says_when_it_is_missing(
    trainer: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    out = tmp_path / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=30, tool="py-spy")
    assert summary == f"no stacks for pid {trainer.proc.pid}: py-spy is not installed"
    assert trainer.proc.poll() is None


def test_py_spy_reads_a_stopped_trainer(trainer: Trainer, tmp_path: Path) -> None:
    require_py_spy_attaches(trainer.proc.pid)
    trainer.stop()
    out = tmp_path / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=30, tool="py-spy")
    assert summary.startswith("py-spy stacks")
    assert "wait_for_collective" in out.read_text()


def test_faulthandler_convention(trainer: Trainer, tmp_path: Path) -> None:
    assert catches_signal(trainer.proc.pid, STACK_DUMP_SIGNAL)
    out = tmp_path / "stacks.txt"
    summary = capture_stacks([trainer.proc.pid], out, timeout=5, tool="faulthandler")
    assert summary == f"stacks written to the log by faulthandler (pid {trainer.proc.pid})"
    log = trainer.wait_for("in wait_for_collective")
    assert "most recent call first" in log
    assert 'trainer.py", line 7 in wait_for_collective' in log
    assert "faulthandler writes the stacks to the trainer's log" in out.read_text()
    assert trainer.proc.poll() is None


def test_faulthandler_on_a_stopped_trainer_waits_for_continue(
    trainer: Trainer, tmp_path: Path
) -> None:
    trainer.stop()
    out = tmp_path / "stacks.txt"
    capture_stacks([trainer.proc.pid], out, timeout=5, tool="faulthandler")
    assert "when the process is continued (it is stopped now)" in out.read_text()
    os.kill(trainer.proc.pid, signal.SIGCONT)
    trainer.wait_for("in wait_for_collective")


def test_a_process_without_the_handler_is_not_signalled(tmp_path: Path) -> None:
    plain = Trainer(tmp_path, register=False)
    try:
        assert not catches_signal(plain.proc.pid, STACK_DUMP_SIGNAL)
        out = tmp_path / "stacks.txt"
        summary = capture_stacks([plain.proc.pid], out, timeout=5, tool="faulthandler")
        assert summary.startswith(f"no stacks for pid {plain.proc.pid}: not signalled")
        time.sleep(0.2)
        assert plain.proc.poll() is None  # the signal's default action would have killed it
    finally:
        plain.close()


def test_gone_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(done.stdout)
    summary = capture_stacks([gone], tmp_path / "stacks.txt", timeout=10)
    assert summary.startswith(f"no stacks for pid {gone}")
    assert capture_stacks([], tmp_path / "none.txt", timeout=1) == "no processes to capture"


def test_auto_falls_back_when_py_spy_cannot_read_the_process(tmp_path: Path) -> None:
    # Not a Python process: py-spy fails, and `sleep` does not catch the dump signal.
    require_tool("py-spy", 'it is a dev dependency: pip install -e ".[dev]"')
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        out = tmp_path / "stacks.txt"
        summary = capture_stacks([sleeper.pid], out, timeout=20)
        assert summary.startswith(f"no stacks for pid {sleeper.pid}: not signalled")
        text = out.read_text()
        assert f"== pid {sleeper.pid}: faulthandler ==" in text
        assert "py-spy failed" in text
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
