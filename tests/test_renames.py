"""Old names that still work (issue 13's one name per concept): `ftsup checkpoint JOB`
is `ftsup save JOB`, the `checkpoint` request is `save`, `ftsup ckpt` is
`ftsup checkpoints`, and stored `checkpoint_requested` events read as `save_requested`."""

from __future__ import annotations

from pathlib import Path

from ftsup.supervisor import store
from ftsup.supervisor.client import Client
from ftsup.supervisor.paths import SOCKET_NAME
from ftsup.supervisor.protocol import EventKind, RequestError
from tests.supervisor_harness import Harness


def test_the_old_save_verb_warns_and_asks_the_daemon_to_save(daemon: Harness) -> None:
    old = daemon.cli("checkpoint", "nosuchjob", check=False)
    new = daemon.cli("save", "nosuchjob", check=False)
    assert "`ftsup checkpoint` is now `ftsup save`" in old.stderr
    assert "is now" not in new.stderr
    # Both reached the daemon's save handler, which knows no such job.
    assert old.returncode == new.returncode != 0
    assert "nosuchjob" in old.stderr and "nosuchjob" in new.stderr


def test_the_daemon_answers_the_old_request_name_as_save(daemon: Harness) -> None:
    socket_path = daemon.runtime_dir / SOCKET_NAME
    codes = []
    for kind in ("checkpoint", "save", "no_such_request"):
        with Client(socket_path) as client:
            try:
                client.request(kind, job="nosuchjob")
            except RequestError as exc:
                codes.append(exc.code)
    assert codes[0] == codes[1] != "unknown_request"
    assert codes[2] == "unknown_request"


def test_ckpt_is_an_alias_of_checkpoints(harness: Harness, tmp_path: Path) -> None:
    empty = tmp_path / "out"
    empty.mkdir()
    long = harness.cli("checkpoints", "ls", str(empty), "--json", check=False)
    short = harness.cli("ckpt", "ls", str(empty), "--json", check=False)
    assert (long.returncode, long.stdout) == (short.returncode, short.stdout)
    assert long.stdout.strip()


def test_stored_events_of_a_renamed_kind_read_in_todays_words(tmp_path: Path) -> None:
    path = tmp_path / "ftsup.db"
    old = store.Store(path)
    old.add_event("job", "checkpoint_requested", "asked the trainer to save now")
    old.close()
    reopened = store.Store(path)
    try:
        (event,) = reopened.events("job")
        assert event["kind"] == EventKind.SAVE_REQUESTED == "save_requested"
    finally:
        reopened.close()
