"""The output lock of a multi-node job (issue 17): the nodes of one job share it,
every other job is refused. Real `flock`s: each acquisition opens its own file
description, so two in one process conflict exactly as two processes do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.supervisor import outlock


@pytest.fixture
def held() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def release(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def test_nodes_of_one_job_share_the_folder_and_exclude_everyone_else(
    tmp_path: Path, held: list[int]
) -> None:
    node1 = outlock.acquire_for_group(tmp_path, {"job": "big", "pid": 1}, "ftsup-big")
    node2 = outlock.acquire_for_group(tmp_path, {"job": "big", "pid": 2}, "ftsup-big")
    held += node1 + node2
    assert not outlock.is_locked(tmp_path, group="ftsup-big")

    # A single-node job: refused at submit and at the lock.
    assert outlock.is_locked(tmp_path)
    with pytest.raises(outlock.OutputLocked) as single:
        outlock.acquire(tmp_path, {"job": "small", "pid": 3})
    assert single.value.holder == {"job": "big", "group": "ftsup-big"}

    # A node of another multi-node job: the live group file names the owner.
    assert outlock.is_locked(tmp_path, group="ftsup-other")
    with pytest.raises(outlock.OutputLocked) as other:
        outlock.acquire_for_group(tmp_path, {"job": "other", "pid": 4}, "ftsup-other")
    assert other.value.holder == {"job": "big", "group": "ftsup-big"}
    assert "ftsup-big" in other.value.path.name

    # One node gone: the other still holds the folder for the job.
    release(node1)
    assert outlock.is_locked(tmp_path)
    # Both gone (a stale group file stays behind): anyone may take it.
    held.clear()
    release(node2)
    assert not outlock.is_locked(tmp_path)
    assert not outlock.is_locked(tmp_path, group="ftsup-other")
    held += outlock.acquire_for_group(tmp_path, {"job": "other", "pid": 4}, "ftsup-other")


def test_a_single_node_holder_excludes_every_group(tmp_path: Path, held: list[int]) -> None:
    held.append(outlock.acquire(tmp_path, {"job": "small", "pid": 3}))
    assert outlock.is_locked(tmp_path, group="ftsup-big")
    with pytest.raises(outlock.OutputLocked) as refused:
        outlock.acquire_for_group(tmp_path, {"job": "big", "pid": 1}, "ftsup-big")
    assert refused.value.holder == {"job": "small", "pid": 3}
    # Nothing of the refused node is left holding anything.
    release(held)
    assert not outlock.is_locked(tmp_path)


def test_the_next_attempt_of_a_node_waits_only_for_its_own_job(
    tmp_path: Path, held: list[int]
) -> None:
    """`acquire_after_predecessor` with a group: an earlier attempt of the same job
    holding the folder exclusively (its last process dying) is waited for; the
    wait ends when it lets go."""
    earlier = outlock.acquire(tmp_path, {"job": "big", "pid": 9})
    with pytest.raises(outlock.OutputLocked):  # still held after the timeout
        outlock.acquire_after_predecessor(tmp_path, {"job": "big"}, group="ftsup-big", timeout=0.2)
    os.close(earlier)
    held += outlock.acquire_after_predecessor(tmp_path, {"job": "big"}, group="ftsup-big")
    assert len(held) == 2


def test_group_names_become_safe_file_names(tmp_path: Path) -> None:
    path = outlock.group_lock_path(tmp_path, "../../etc/x y")
    assert path.parent == tmp_path and "/" not in path.name
    assert path.name == ".ftsup.group-.._.._etc_x_y.lock"
