"""One vocabulary: requests, event kinds and job states are defined once (protocol.py)
and everything that names them (daemon, CLI, TUI, notifications, docs) agrees."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ftsup.supervisor import protocol, spec, spec_types, store
from ftsup.supervisor.cli import demo_cmd
from ftsup.supervisor.cli.render import state_text as cli_state_text
from ftsup.supervisor.daemon import state_rebuild
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.handlers import ROUTES, Handlers, check_routes
from ftsup.supervisor.daemon.server import HandlerTableError, SocketServer, check_handler_table
from ftsup.supervisor.protocol import (
    LIVE_STATES,
    NOTIFY_EVENTS,
    REQUEST_TYPES,
    STATE_STYLES,
    TERMINAL_STATES,
    EventKind,
    JobState,
    RequestType,
)
from ftsup.supervisor.service import notify
from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.tui import model as tui_model
from ftsup.tui.widgets.event_timeline import event_cells
from ftsup.tui.widgets.state_text import EVENT_STYLES, event_kind_text
from ftsup.tui.widgets.state_text import state_text as tui_state_text
from tests.supervisor_harness import Harness, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KIND_VALUES = {kind.value for kind in EventKind}


# --- requests ----------------------------------------------------------------------


def test_request_types_are_the_enum() -> None:
    assert {str(t) for t in REQUEST_TYPES} == {t.value for t in RequestType}


def test_every_request_type_has_a_handler_and_no_handler_is_extra() -> None:
    served = set(ROUTES) | set(protocol.CONNECTION_REQUESTS)
    assert served == set(RequestType)
    # The table the daemon serves is built from ROUTES and names real methods.
    for kind, method in ROUTES.items():
        assert callable(getattr(Handlers, method)), (kind, method)


def _kind_of(arg: ast.expr, enum: type[RequestType] | type[EventKind]) -> str | None:
    """The string a call passes as its kind: a literal, or `Enum.NAME` (an unknown NAME
    comes back as `Enum.NAME`, which no enum value equals); None for anything else."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if (
        isinstance(arg, ast.Attribute)
        and isinstance(arg.value, ast.Name)
        and arg.value.id == enum.__name__
    ):
        member = enum.__members__.get(arg.attr)
        return member.value if member is not None else f"{enum.__name__}.{arg.attr}"
    return None


def _client_requests() -> list[tuple[str, str]]:
    """(place, type) of every `x.request(TYPE, ...)` call in the CLI, the client and the
    TUI: what clients ask must be a request the daemon serves."""
    found: list[tuple[str, str]] = []
    for path in sorted([*(ROOT / "supervisor").rglob("*.py"), *(ROOT / "tui").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("request", "_request", "_optional", "_send")
                and node.args
            ):
                kind = _kind_of(node.args[0], RequestType)
                if kind is not None:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", kind))
    return found


def test_every_request_a_client_sends_is_a_request_type() -> None:
    found = _client_requests()
    assert len(found) > 10, "the walk found too few request calls to be looking at the CLI"
    values = {t.value for t in RequestType}
    unknown = [(place, kind) for place, kind in found if kind not in values]
    assert unknown == [], f"requests missing from protocol.RequestType: {unknown}"


@pytest.mark.parametrize("dropped", sorted(ROUTES))
def test_a_missing_handler_is_refused(dropped: RequestType) -> None:
    table = {str(kind): method for kind, method in ROUTES.items() if kind != dropped}
    with pytest.raises(HandlerTableError, match=f"'{dropped.value}'"):
        check_handler_table(table)
    with pytest.raises(HandlerTableError, match=f"'{dropped.value}'"):
        check_routes({kind: method for kind, method in ROUTES.items() if kind != dropped})


def test_an_extra_or_misnamed_handler_is_refused() -> None:
    with pytest.raises(HandlerTableError, match="frobnicate"):
        check_handler_table([*map(str, ROUTES), "frobnicate"])
    with pytest.raises(HandlerTableError, match="no_such_method"):
        check_routes({**ROUTES, RequestType.PING: "no_such_method"})
    check_handler_table(map(str, ROUTES))  # the real table passes


def test_socket_server_refuses_an_incomplete_handler_table(tmp_path: Path) -> None:
    state = store.Store(tmp_path / "state" / "ftsup.db")
    try:
        bus = EventBus(state)

        async def ping(request: dict[str, object]) -> dict[str, object]:
            return {}

        with pytest.raises(HandlerTableError, match="status"):
            SocketServer(tmp_path / "ftsup.sock", {"ping": ping}, bus, dict)
    finally:
        state.close()


# --- event kinds -------------------------------------------------------------------


def _emitted_kinds() -> list[tuple[str, str]]:
    """(place, kind) of every `x.emit(job, KIND, ...)` and `self._emit(KIND, ...)` call
    in supervisor/ whose KIND is a string literal or `EventKind.NAME` (the runner's
    `_emit` helpers take the kind first; the bus's `emit` takes the job first)."""
    found: list[tuple[str, str]] = []
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            if name == "emit" and len(node.args) >= 2:
                arg: ast.expr | None = node.args[1]
            elif name == "_emit" and node.args:
                arg = node.args[0]
            elif name in ("emit", "_emit"):
                arg = next((k.value for k in node.keywords if k.arg == "kind"), None)
            else:
                continue
            kind = _kind_of(arg, EventKind) if arg is not None else None
            if kind is not None:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", kind))
    return found


def test_every_emitted_kind_is_an_event_kind() -> None:
    found = _emitted_kinds()
    assert len(found) > 30, "the walk found too few emit calls to be looking at the daemon"
    unknown = [(place, kind) for place, kind in found if kind not in KIND_VALUES]
    assert unknown == [], f"emitted kinds missing from protocol.EventKind: {unknown}"


def test_the_demo_narrates_event_kinds() -> None:
    assert set(demo_cmd.NARRATED) <= KIND_VALUES


def test_terminal_states_are_event_kinds() -> None:
    # The runner's _finish emits the final state itself as the event kind.
    assert set(TERMINAL_STATES) <= KIND_VALUES


def test_every_event_kind_has_a_tui_style() -> None:
    assert set(EVENT_STYLES) == set(EventKind)
    assert all(EVENT_STYLES[kind] for kind in EventKind)


def test_hung_is_shown_red_and_a_cut_kind_keeps_its_style() -> None:
    assert event_kind_text("hung").spans[0].style == "bold red"
    # The timeline's cell, as the TUI draws a daemon's `hung` event.
    hung = {"id": 1, "ts": 0.0, "job": "j", "kind": "hung", "message": "no progress"}
    assert event_cells(hung)[1].spans[0].style == "bold red"
    cut = event_kind_text(EventKind.SAVE_REQUESTED.value, 10)
    assert len(cut.plain) == 10 < len(EventKind.SAVE_REQUESTED.value)
    assert cut.spans[0].style == EVENT_STYLES[EventKind.SAVE_REQUESTED] != "dim"


# --- notifications -----------------------------------------------------------------


def test_notify_names_are_event_kinds_and_defined_once() -> None:
    assert set(NOTIFY_EVENTS) <= set(EventKind)
    assert not hasattr(notify, "EVENTS")  # the second, unused list is gone
    assert tuple(kind.value for kind in NOTIFY_EVENTS) == spec.NOTIFY_EVENTS
    assert set(spec_types.NotifySection().on) <= KIND_VALUES
    assert set(protocol.NOTIFY_ALIASES.values()) <= set(NOTIFY_EVENTS)


JOB = """\
[job]
name = "demo"
output_dir = "runs/demo"

[command]
argv = ["python", "train.py"]
resume_args = ["--resume_from_checkpoint", "{checkpoint}"]

[notify]
command = ["true"]
"""


def test_notify_on_takes_the_event_names_and_the_old_restarted(tmp_path: Path) -> None:
    every = ", ".join(f'"{kind.value}"' for kind in NOTIFY_EVENTS)
    spec = parse_spec(JOB + f"on = [{every}]\n", tmp_path / "job.toml")
    assert spec.notify.on == tuple(kind.value for kind in NOTIFY_EVENTS)
    # `restarted` (the old spelling) is read as the event the daemon emits.
    spec = parse_spec(JOB + 'on = ["restarted", "hung"]\n', tmp_path / "job.toml")
    assert spec.notify.on == ("restart", "hung")
    assert notify.wanted(spec.notify, EventKind.RESTART)
    with pytest.raises(SpecError, match="hang"):
        parse_spec(JOB + 'on = ["hang"]\n', tmp_path / "job.toml")


def test_service_docs_list_the_notify_events() -> None:
    text = (DOCS / "service.md").read_text()
    paragraph = text[text.index("\nEvents: ") :].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", paragraph)) - set(protocol.NOTIFY_ALIASES)
    assert named == {kind.value for kind in NOTIFY_EVENTS}


# --- job states --------------------------------------------------------------------


def test_live_and_terminal_states_partition_the_states() -> None:
    assert set(LIVE_STATES) | set(TERMINAL_STATES) == {s.value for s in JobState}
    assert not set(LIVE_STATES) & set(TERMINAL_STATES)
    assert store.LIVE_STATES == LIVE_STATES and store.TERMINAL_STATES == TERMINAL_STATES
    assert set(LIVE_STATES) == tui_model.LIVE_STATES
    assert set(state_rebuild.LIVE_STATES) == set(LIVE_STATES)


@pytest.mark.parametrize("state", list(JobState))
def test_cli_and_tui_colour_a_state_alike(state: JobState) -> None:
    style = STATE_STYLES[state]
    assert cli_state_text(state.value) == f"[{style}]{state.value}[/]"
    assert tui_state_text(state.value).spans[0].style == style


def test_every_state_has_one_colour() -> None:
    assert set(STATE_STYLES) == set(JobState)


# --- docs --------------------------------------------------------------------------


def _doc_table(section: str) -> set[str]:
    """Backquoted names in the first column of the table under `## section`."""
    text = (DOCS / "events.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, flags=re.M))


def test_docs_list_every_request_event_kind_and_state() -> None:
    assert _doc_table("Requests") == {t.value for t in RequestType}
    assert _doc_table("Event kinds") == KIND_VALUES
    assert _doc_table("Job states") == {s.value for s in JobState}
    assert "(events.md)" in (DOCS / "supervisor.md").read_text()


def test_docs_state_colours_are_the_table() -> None:
    text = (DOCS / "events.md").read_text()
    body = text.split("\n## Job states\n", 1)[1]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+?) \|$", body, flags=re.M))
    assert rows == {str(state): style for state, style in STATE_STYLES.items()}


# --- end to end --------------------------------------------------------------------


def test_a_restart_reaches_a_receiver_that_asked_for_restarted(daemon: Harness) -> None:
    """The daemon emits `restart`; a job file written with the old `[notify]` name
    `restarted` is still notified, and the receiver is told the event's one name."""
    told = daemon.work / "told.txt"
    hook = f'echo "$FTSUP_EVENT" >> {told}'
    notify_table = f'\n[notify]\ncommand = ["sh", "-c", {hook!r}]\non = ["restarted", "finished"]\n'
    job = daemon.toy_job("bumpy", "--max-steps", "6", "--crash-at", "3", extra=notify_table)
    daemon.cli("start", str(job))
    daemon.wait_state("bumpy", "finished")
    wait_for(
        lambda: told.exists() and len(told.read_text().split()) >= 2,
        30,
        what="two notifications",
    )
    kinds = [e["kind"] for e in daemon.cli_json("events", "bumpy")["events"]]
    assert kinds.count("restart") == 1
    # Deliveries run in the background: their order is not the events' order.
    assert sorted(told.read_text().split()) == ["finished", "restart"]
