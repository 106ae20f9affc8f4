"""Which memory snapshot a restart may resume (supervisor/memory_tier.py, issue 18).

Snapshots are built here with the trainer's files and sealed by the trainer's
own `seal` (the record, written last); the rules are the daemon's: sealed,
every file at its recorded size, newer than the newest valid disk checkpoint,
of this job, this lineage and exactly this configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.contract import MEMORY_FORMAT, MEMORY_RECORD, MEMORY_SLOTS, checkpoint_name
from ftsup.supervisor.daemon.launcher import memory_settings
from ftsup.supervisor.memory_tier import (
    AUTO_EVERY,
    RAM_FILE_SYSTEMS,
    SHM,
    boot_id,
    current_lineage,
    filesystem_type,
    memory_dir,
    memory_every,
    new_lineage,
    newest_usable,
    shm_folder,
)
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.trainer_launch import write_train_json
from ftsup.trainer.config import load_run_config
from ftsup.trainer.memory_snapshot import HISTORY_NAME, STATE_NAME, TENSORS_NAME, seal
from tests.supervisor_harness import REPO

FINGERPRINT = {"model": "tiny", "lr": 0.001, "world_size": 1}
JOB, LINEAGE = "lora", "a1b2c3"


def snapshot(
    root: Path,
    slot: int,
    step: int,
    *,
    job: str = JOB,
    lineage: str = LINEAGE,
    fingerprint: dict[str, object] | None = None,
    sealed: bool = True,
    **record: Any,
) -> Path:
    folder = root / MEMORY_SLOTS[slot] / checkpoint_name(step)
    folder.mkdir(parents=True)
    files = {
        TENSORS_NAME: b"t" * (100 + step),
        STATE_NAME: b"s" * 300,
        HISTORY_NAME: json.dumps({"loss": 1.0, "step": step}).encode() + b"\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if sealed:
        contents = {
            "job": job,
            "lineage": lineage,
            "step": step,
            "attempt": 1,
            "created_at": 0,
            "fingerprint": fingerprint or FINGERPRINT,
            "boot": boot_id(),
            "format": MEMORY_FORMAT,
            "files": {name: len(data) for name, data in files.items()},
        }
        seal(folder, {**contents, **record})
    return folder


def choose(root: Path, newer_than: int = -1, **kw: object) -> Path | None:
    args: dict[str, object] = {"job": JOB, "lineage": LINEAGE, "fingerprint": FINGERPRINT}
    args.update(kw)
    found = newest_usable(root, newer_than=newer_than, **args)  # type: ignore[arg-type]
    return found.path if found is not None else None


def test_the_newest_sealed_snapshot_is_chosen_across_the_two_slots(tmp_path: Path) -> None:
    older = snapshot(tmp_path, 0, 41)
    newer = snapshot(tmp_path, 1, 42)
    assert choose(tmp_path) == newer
    found = newest_usable(
        tmp_path, job=JOB, lineage=LINEAGE, fingerprint=FINGERPRINT, newer_than=-1
    )
    assert found is not None and found.step == 42 and found.attempt == 1
    assert found.size_bytes == sum(
        f.stat().st_size for f in newer.iterdir() if f.name != MEMORY_RECORD
    )
    assert older.exists()


def test_a_write_cut_short_is_never_resumed_and_the_other_slot_is(tmp_path: Path) -> None:
    kept = snapshot(tmp_path, 0, 41)
    snapshot(tmp_path, 1, 42, sealed=False)  # killed before the seal
    assert choose(tmp_path) == kept


def test_a_sealed_file_that_changed_size_is_refused(tmp_path: Path) -> None:
    folder = snapshot(tmp_path, 0, 42)
    with (folder / STATE_NAME).open("r+b") as handle:
        handle.truncate(10)
    assert choose(tmp_path) is None


def test_a_snapshot_no_newer_than_the_newest_disk_checkpoint_is_never_used(
    tmp_path: Path,
) -> None:
    snapshot(tmp_path, 0, 40)
    assert choose(tmp_path, newer_than=40) is None  # same step: the disk checkpoint wins
    assert choose(tmp_path, newer_than=45) is None
    assert choose(tmp_path, newer_than=39) is not None


@pytest.mark.parametrize(
    "other",
    [
        {"job": "another-job"},
        {"lineage": "an-abandoned-line"},
        {"fingerprint": {**FINGERPRINT, "lr": 0.002}},
        {"boot": "an-earlier-boot"},
        {"boot": None},
    ],
    ids=["job", "lineage", "configuration", "earlier-boot", "no-boot-id"],
)
def test_a_snapshot_of_another_job_lineage_configuration_or_boot_is_never_used(
    tmp_path: Path, other: dict[str, object]
) -> None:
    snapshot(tmp_path, 0, 42, **other)  # type: ignore[arg-type]
    assert choose(tmp_path) is None


@pytest.mark.parametrize(
    "record",
    [{"format": 1}, {"files": {}}, {"files": {STATE_NAME: 300, "missing.bin": 1}}],
    ids=["old-format", "no-files", "a-file-missing"],
)
def test_a_record_that_does_not_vouch_for_the_files_is_refused(
    tmp_path: Path, record: dict[str, Any]
) -> None:
    snapshot(tmp_path, 0, 42, **record)
    assert choose(tmp_path) is None


def test_no_memory_folder_means_no_snapshot(tmp_path: Path) -> None:
    assert choose(tmp_path / "gone") is None


def test_the_lineage_token_is_kept_until_renewed(tmp_path: Path) -> None:
    first = current_lineage(tmp_path)
    assert current_lineage(tmp_path) == first
    renewed = new_lineage(tmp_path)
    assert renewed != first and current_lineage(tmp_path) == renewed


def job(tmp_path: Path, train: str = "", extra: str = "") -> JobSpec:
    return parse_spec(job_text(tmp_path, extra, train), tmp_path / "job.toml")


def job_text(tmp_path: Path, extra: str = "", train: str = "") -> str:
    return f"""
[job]
name = "{JOB}"
output_dir = "{tmp_path / "out"}"

[train]
model = "m"
dataset = ["d.jsonl"]
{train}
{extra}
"""


def test_the_tier_is_on_for_one_process_lora_jobs_and_opt_in_otherwise(tmp_path: Path) -> None:
    assert memory_every(job(tmp_path)) == AUTO_EVERY["lora"] == 1  # auto, LoRA: every step
    assert memory_every(job(tmp_path, 'finetuning_type = "qlora"')) == 1
    assert memory_every(job(tmp_path, 'finetuning_type = "full"')) == 0  # auto, full: off
    assert memory_every(job(tmp_path, extra="[checkpoint]\nmemory_every = 1")) == 1
    explicit = job(tmp_path, 'finetuning_type = "full"', "[checkpoint]\nmemory_every = 5")
    assert memory_every(explicit) == 5
    off = job(tmp_path, extra="[checkpoint]\nmemory_every = 0")
    assert memory_every(off) == 0
    two = job(tmp_path, extra="[launch]\nnproc_per_node = 2")  # auto, several processes
    assert memory_every(two) == 0


def command_job(tmp_path: Path, checkpoint_line: str) -> str:
    """A `[command]` job file whose `[checkpoint]` holds `checkpoint_line`."""
    return f"""
[job]
name = "cmd"
output_dir = "{tmp_path / "out"}"

[command]
argv = ["python", "train.py"]

[checkpoint]
{checkpoint_line}
"""


@pytest.fixture
def ram_runtime() -> Iterator[Path]:
    """A runtime folder on tmpfs, as systemd's: the snapshots' folder is inside it."""
    folder = Path(tempfile.mkdtemp(dir=SHM))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_jobs_time_budget_for_snapshots_reaches_the_trainer(
    tmp_path: Path, ram_runtime: Path
) -> None:
    """`[checkpoint] memory_overhead` goes through train.json into the trainer's own
    config; absent, train.json leaves it out and the trainer's default applies."""
    layout = Layout.from_env(tmp_path / "state", ram_runtime)
    for extra, expected in (("", None), ("[checkpoint]\nmemory_overhead = 0.05", 0.05)):
        spec = job(tmp_path, extra=extra)
        assert spec.train is not None
        path = write_train_json(
            tmp_path / "train.json",
            spec.train,
            output_dir=tmp_path / "out",
            memory=memory_settings(spec, layout),
        )
        memory = load_run_config(path, check_files=False).memory
        assert memory is not None and memory.max_overhead == expected
    for bad in ("1", '"5%"', "-0.1"):
        with pytest.raises(SpecError, match="memory_overhead"):
            job(tmp_path, extra=f"[checkpoint]\nmemory_overhead = {bad}")
    with pytest.raises(SpecError, match=r"memory_overhead.*needs a \[train\] job"):
        parse_spec(command_job(tmp_path, "memory_overhead = 0.05"), tmp_path / "cmd.toml")


def test_the_memory_folder_is_in_ram_and_per_daemon_unless_configured(
    tmp_path: Path, ram_runtime: Path
) -> None:
    """In the runtime folder when that is tmpfs (systemd's); else in a private folder
    of the daemon's in /dev/shm (an on-demand daemon's /tmp/ftsup-UID may be on a
    disk, where every snapshot is written back); the job's memory_dir wins."""
    spec = job(tmp_path)
    on_disk = next(p for p in (tmp_path, REPO, Path.home()) if not_in_ram(p)) / "no-such-rt"
    try:
        in_ram = Layout.from_env(tmp_path / "s", ram_runtime)
        assert memory_dir(spec, in_ram) == ram_runtime / "memory" / JOB
        folder = memory_dir(spec, Layout.from_env(tmp_path / "s", on_disk))
        assert folder == shm_folder(on_disk) / "memory" / JOB
        assert filesystem_type(folder) == "tmpfs"
        private = os.stat(shm_folder(on_disk))
        assert (private.st_uid, stat.S_IMODE(private.st_mode)) == (os.geteuid(), 0o700)
        assert not on_disk.exists()  # nothing written there
        other = memory_dir(spec, Layout.from_env(tmp_path / "s", on_disk.parent / "rt-2"))
        assert other.parent != folder.parent  # two daemons never share one
        configured = replace(spec, checkpoint=replace(spec.checkpoint, memory_dir="/dev/shm/x"))
        assert memory_dir(configured, Layout.from_env(tmp_path / "s", on_disk)) == SHM / "x" / JOB
    finally:
        for runtime in (on_disk, on_disk.parent / "rt-2"):
            shutil.rmtree(shm_folder(runtime), ignore_errors=True)


def not_in_ram(path: Path) -> bool:
    return filesystem_type(path) not in RAM_FILE_SYSTEMS


def test_the_file_system_of_a_path_is_that_of_its_longest_mount_point() -> None:
    mounts = (
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n"
        "tmpfs /run/user/1000 tmpfs rw,nosuid,nodev,mode=700 0 0\n"
        "/dev/vdb /mnt/my\\040data xfs rw 0 0\n"
    )
    assert filesystem_type(Path("/run/user/1000/ftsup"), mounts) == "tmpfs"
    assert filesystem_type(Path("/run/user/10000/ftsup"), mounts) == "ext4"  # not a prefix
    assert filesystem_type(Path("/mnt/my data/x"), mounts) == "xfs"
    assert filesystem_type(Path("/tmp/ftsup-0/memory"), mounts) == "ext4"
    assert filesystem_type(Path("/dev/shm"), mounts) == "tmpfs"
    # This machine's own table: /dev/shm is RAM wherever ftsup runs (Linux).
    assert filesystem_type(SHM) in RAM_FILE_SYSTEMS


def test_the_job_file_refuses_a_memory_tier_it_cannot_keep(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"memory_every.*one process only"):
        job(tmp_path, extra="[checkpoint]\nmemory_every = 1\n\n[launch]\nnproc_per_node = 2")
    with pytest.raises(SpecError, match=r"memory_every.*needs a \[train\] job"):
        parse_spec(command_job(tmp_path, "memory_every = 1"), tmp_path / "cmd.toml")


def test_ftsup_check_warns_when_the_memory_folder_is_on_a_disk(tmp_path: Path) -> None:
    """Each snapshot would be written back to a disk for nothing (none is resumed after
    a reboot): `ftsup check` says so and names the key's line; a RAM folder, or a job
    without a memory tier, draws no warning. The job stays valid either way."""
    on_disk = next(p for p in (tmp_path, REPO, Path.home()) if not_in_ram(p)) / "snapshots"
    results = {}
    for name, folder, every in (("disk", on_disk, 1), ("ram", SHM / "x", 1), ("off", on_disk, 0)):
        text = job_text(tmp_path, f'[checkpoint]\nmemory_dir = "{folder}"\nmemory_every = {every}')
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        results[name] = subprocess.run(
            [sys.executable, "-m", "ftsup.supervisor", "check", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert results[name].returncode == 0, results[name].stderr
    (warning,) = json.loads(results["disk"].stdout)["warnings"]
    assert warning["key"] == "checkpoint.memory_dir"
    assert warning["line"] == text.splitlines().index(f'memory_dir = "{on_disk}"') + 1
    assert warning["message"].startswith(f"{on_disk} is on {filesystem_type(on_disk)}, not in RAM")
    for name in ("ram", "off"):
        assert json.loads(results[name].stdout)["warnings"] == [], name
    assert not on_disk.exists()  # looked at, never created
