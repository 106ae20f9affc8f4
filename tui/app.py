"""`FtsupApp`: the Textual application behind `ftsup tui`.

Data flow: a `Source` (the live `DaemonConnection`, or a `RecordedSource`)
runs in a worker and posts messages; the app folds each into its `TuiState`
(pure, bounded) and tells the topmost data screen what changed. Requests run
in workers too, so the UI never waits on the daemon. The only timer ticks once
a second, for ages ("3m ago"); everything else is redrawn on events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine, Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from ftsup.supervisor.protocol import EventKind, RequestError, RequestType
from ftsup.tui.messages import Connected, DaemonEvent, Disconnected
from ftsup.tui.model import Change, TuiState
from ftsup.tui.screens.base import StateScreen
from ftsup.tui.screens.confirm import ConfirmScreen
from ftsup.tui.screens.dashboard import DashboardScreen
from ftsup.tui.screens.gpu_map import GpuMapScreen
from ftsup.tui.screens.help import HelpScreen
from ftsup.tui.screens.job import JobScreen
from ftsup.tui.screens.start_job import StartJobScreen
from ftsup.tui.source import NotConnected, Source
from ftsup.tui.widgets.log_view import LogView

log = logging.getLogger("ftsup.tui")

JOB_PARTS = ("detail", "events", "history", "logs", "checkpoints", "gpus")
HISTORY_EVENTS = 300  # durable events fetched at (re)connect
JOB_EVENTS = 200
LOG_TAIL = 1000
GPU_POLL_S = 5.0
DETAIL_POLL_S = 10.0  # the open job's status: goodput and standby change without events
SYNC_DELAY_S = 0.03


class FtsupApp(App[None]):
    """The TUI. `source` is where the data comes from (see `ftsup.tui.source`)."""

    TITLE = "ftsup"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", tooltip="this screen"),
        Binding(
            "s",
            "stop_job",
            "Stop",
            tooltip="stop the job gracefully: it saves a checkpoint, then exits",
        ),
        Binding("k", "kill_job", "Kill", tooltip="kill the job now (no checkpoint)"),
        Binding("r", "restart_job", "Restart", tooltip="restart from the newest valid checkpoint"),
        Binding("c", "save_job", "Save", tooltip="ask the trainer to save a checkpoint now"),
        Binding("n", "start_job", "New", tooltip="start a job from a job file"),
        Binding("m", "gpu_map", "GPUs", tooltip="GPU map (who holds which GPU) and the queue"),
        Binding("q", "quit", "Quit", tooltip="leave the TUI (jobs keep running)"),
    ]

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.state = TuiState()
        self.state.connection.target = source.target
        self.synced = asyncio.Event()  # set after each complete (re)load; tests wait on it
        self._refetch_dirty = False
        self._refetch_running = False
        self._queue_dirty = False
        self._queue_running = False
        self._job_pending: dict[str, set[str]] = {}
        self._job_loading: set[str] = set()
        self._last_gpu_sample = 0.0
        self._last_detail_poll = 0.0
        self._last_queue_poll = 0.0
        self._ever_connected = False
        self._unsynced = Change()
        self._flush_timer: Timer | None = None
        self.actions_sent: deque[tuple[str, dict[str, Any]]] = deque(maxlen=50)  # for tests
        self._unsupported: set[str] = set()  # requests this daemon answered "unknown_request"

    # lifecycle ------------------------------------------------------------------
    def on_mount(self) -> None:
        self.push_screen(DashboardScreen(self.state, self.source.now))
        self.run_worker(
            self._connection_loop(), name="connection", group="connection", exit_on_error=False
        )
        self.set_interval(1.0, self._tick)

    async def _connection_loop(self) -> None:
        """The source's loop, restarted if it ever fails: a lost daemon must not end the app."""
        while True:
            try:
                await self.source.run(self.post_message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug; keep the UI alive and say so
                log.exception("the connection worker failed")
                self.post_message(Disconnected(f"internal error: {exc!r}", 1, 1.0))
                await asyncio.sleep(1.0)

    def _spawn(self, work: Coroutine[Any, Any, None], group: str) -> None:
        """Run `work` in a worker whose failure is reported, never fatal to the app."""
        self.run_worker(work, group=group, exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.group != "connection":
            error = event.worker.error
            log.error("worker %s failed: %r", event.worker.group, error)
            self.notify(
                f"internal error in {event.worker.group}: {error!r}", severity="error", timeout=10
            )

    async def on_unmount(self) -> None:
        await self.source.close()

    def _tick(self) -> None:
        if not self.is_running:  # exiting: the screens are losing their widgets
            return
        screen = self._data_screen()
        if screen is not None:
            screen.tick()
        gpus = self.state.gpus
        now = self.source.now()
        if (
            gpus.available
            and self.state.connection.state == "connected"
            and (now - self._last_gpu_sample > GPU_POLL_S)
        ):
            self._last_gpu_sample = now
            self._spawn(self._load_gpus(), "gpus")
        if (
            isinstance(screen, GpuMapScreen)
            and self.state.connection.state == "connected"
            and now - self._last_queue_poll > GPU_POLL_S  # foreign memory changes silently
        ):
            self._last_queue_poll = now
            self.schedule_queue()
        connected = self.state.connection.state == "connected"
        if (
            isinstance(screen, JobScreen)
            and connected
            and now - self._last_detail_poll > DETAIL_POLL_S
        ):
            self._last_detail_poll = now
            self._spawn(self._load_part(screen.job_name, "detail"), "detail")

    # messages from the source ---------------------------------------------------
    def on_connected(self, message: Connected) -> None:
        connection = self.state.connection
        connection.state = "replay" if message.daemon.get("replay") else "connected"
        self._ever_connected = True
        self._unsupported.clear()  # a restarted daemon may be a newer one
        connection.daemon = message.daemon
        connection.reason, connection.attempt, connection.retry_in = None, 0, None
        self._apply(Change(connection=True))
        self._spawn(self._load_all(), "load")

    def on_disconnected(self, message: Disconnected) -> None:
        connection = self.state.connection
        connection.state = "reconnecting" if self._ever_connected else "connecting"
        connection.reason = message.reason
        connection.attempt = message.attempt
        connection.retry_in = message.retry_in
        self.synced.clear()
        self._apply(Change(connection=True))

    def on_daemon_event(self, message: DaemonEvent) -> None:
        event = message.event
        kind = event.get("kind")
        if kind == EventKind.GPU:
            self._last_gpu_sample = self.source.now()
        self._apply(self.state.apply_event(event))
        # health changed: show it now, not at the poll
        if kind in (EventKind.GPU_FAULT, EventKind.GPU_RESET):
            self._spawn(self._load_gpus(), "gpus")

    # applying changes -----------------------------------------------------------
    def _data_screen(self) -> StateScreen | None:
        for screen in reversed(self.screen_stack):
            if isinstance(screen, StateScreen):
                return screen
        return None

    def _apply(self, change: Change, *, now: bool = False) -> None:
        """Act on a change at once (requests); show it within SYNC_DELAY_S.

        Events come in bursts (the daemon reads every job's progress in the same
        pass): screens are synced once per burst instead of once per event, which
        halves the frames drawn while jobs stream, for a tenth of a second of delay.
        """
        if not change:
            return
        if change.resync:
            self._spawn(self._load_all(), "load")
        if change.refetch:
            self.schedule_refetch()
        if change.requeue:
            self.schedule_queue()
        self._unsynced |= change
        if now or SYNC_DELAY_S <= 0:
            self._flush_changes()
        elif self._flush_timer is None:
            self._flush_timer = self.set_timer(SYNC_DELAY_S, self._flush_changes)

    def _flush_changes(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        change, self._unsynced = self._unsynced, Change()
        if not change or not self.is_running:
            return
        top = self._data_screen()
        for screen in self.screen_stack:
            if not isinstance(screen, StateScreen):
                continue
            if screen is top and screen.is_mounted and not screen._stale:
                screen.sync(change)
            else:
                screen.mark_stale()

    # loading --------------------------------------------------------------------
    async def _request(self, kind: str, **args: Any) -> dict[str, Any] | None:
        """A request whose failure is shown, not raised; None when it failed."""
        try:
            return await self.source.request(kind, **args)
        except NotConnected:
            return None
        except RequestError as exc:
            if exc.code not in ("not_found", "unknown_request", "not_recorded"):
                self.notify(f"{kind}: {exc.message}", severity="warning")
            return None

    async def _load_all(self) -> None:
        try:
            status = await self.source.request(RequestType.STATUS)
            change = self.state.apply_status_list(status)
            history = await self.source.request(
                RequestType.EVENTS, limit=HISTORY_EVENTS, after_id=self.state.last_event_id
            )
            change |= self.state.apply_history(history.get("events", []))
            for job in list(self.state.jobs.values()):
                if not job.events:  # its newest event is older than the global window
                    answer = await self.source.request(RequestType.EVENTS, job=job.name, limit=5)
                    change |= self.state.apply_history(answer.get("events", []))
            change.refetch = change.requeue = False
            change.roster = True
            self._apply(change, now=True)
            await self._load_gpus()
            await self._load_queue()
        except NotConnected:
            return
        except RequestError as exc:
            self.notify(f"loading from the daemon failed: {exc.message}", severity="error")
            return
        for screen in self.screen_stack:
            if isinstance(screen, JobScreen):
                self.reload_job(screen.job_name, JOB_PARTS)
        self.synced.set()

    async def _load_gpus(self) -> None:
        try:
            result = await self.source.request(RequestType.GPUS)
        except RequestError as exc:
            reason = (
                "not available: this daemon has no `gpus` request"
                if exc.code in ("unknown_request", "not_recorded")
                else exc.message
            )
            self.state.gpus.unavailable(f"GPU monitor {reason}")
        else:
            self.state.gpus.apply(result, sample=False)
        self._apply(Change(gpus=True), now=True)

    async def _load_queue(self) -> None:
        """Who holds which GPU and who waits (`queue`); an older daemon has no such request."""
        try:
            answer = await self._optional(RequestType.QUEUE)
        except RequestError as exc:
            change = self.state.apply_queue(None, f"the daemon refused `queue`: {exc.message}")
        else:
            note = "this daemon has no `queue` request (an older ftsup)"
            change = self.state.apply_queue(answer, "" if answer is not None else note)
        self._apply(change, now=True)

    def schedule_queue(self) -> None:
        """Ask for `queue` again soon; a burst of placement events causes one request."""
        self._queue_dirty = True
        if not self._queue_running:
            self._queue_running = True
            self._spawn(self._requeue(), "queue")

    async def _requeue(self) -> None:
        try:
            while self._queue_dirty:
                self._queue_dirty = False
                await self._load_queue()
        except NotConnected:
            return
        finally:
            self._queue_running = False

    def schedule_refetch(self) -> None:
        """Ask for `status` again soon; bursts of events cause one request, not many."""
        self._refetch_dirty = True
        if not self._refetch_running:
            self._refetch_running = True
            self._spawn(self._refetch(), "refetch")

    async def _refetch(self) -> None:
        try:
            while self._refetch_dirty:
                self._refetch_dirty = False
                status = await self._request(RequestType.STATUS)
                if status is None:
                    return
                change = self.state.apply_status_list(status)
                change.refetch = False
                self._apply(change)
        finally:
            self._refetch_running = False

    def reload_job(self, name: str, parts: Iterable[str]) -> None:
        """(Re)load parts of one job's detail (see JOB_PARTS), coalescing bursts."""
        self._job_pending.setdefault(name, set()).update(parts)
        if name not in self._job_loading:
            self._job_loading.add(name)
            self._spawn(self._load_job(name), f"job:{name}")

    async def _load_job(self, name: str) -> None:
        try:
            while pending := self._job_pending.pop(name, set()):
                for part in JOB_PARTS:
                    if part in pending:
                        await self._load_part(name, part)
                self._flush_changes()
                for screen in self.screen_stack:
                    if isinstance(screen, JobScreen) and screen.job_name == name:
                        if screen is self._data_screen() and screen.is_mounted:
                            screen.redraw_now()
                        screen.loaded.set()
        except NotConnected:
            self._job_pending.pop(name, None)
        finally:
            self._job_loading.discard(name)

    async def _load_part(self, name: str, part: str) -> None:
        source, state = self.source, self.state
        try:
            if part == "detail":
                change = state.apply_job_status(
                    await source.request(RequestType.STATUS, job=name), detail=True
                )
            elif part == "events":
                answer = await source.request(RequestType.EVENTS, job=name, limit=JOB_EVENTS)
                change = state.apply_history(answer.get("events", []))
                change.refetch = False
            elif part == "history":
                history = await self._optional(RequestType.PROGRESS_HISTORY, job=name, limit=2000)
                if history is None:
                    state.job(name).series_note = "since the TUI attached"
                    change = Change(series={name})
                else:
                    change = state.apply_progress_history(name, history)
            elif part == "logs":
                buffer = state.job(name).log
                before = buffer.seq
                answer = await source.request(RequestType.LOGS, job=name, lines=LOG_TAIL)
                since = buffer.newer_than(before) or []
                change = state.apply_logs(name, answer, since)
            elif part == "checkpoints":
                listing = await self._optional(RequestType.CHECKPOINTS, job=name)
                note = "checkpoint list not available: this daemon has no `checkpoints` request"
                change = state.apply_checkpoints(name, listing, None if listing else note)
            elif part == "gpus":
                await self._load_gpus()
                return
            else:  # pragma: no cover - JOB_PARTS is closed
                return
        except RequestError as exc:
            if exc.code != "not_found":
                self.notify(f"{name}: {part}: {exc.message}", severity="warning")
            return
        self._apply(change, now=True)

    async def _optional(self, kind: str, **args: Any) -> dict[str, Any] | None:
        """A request older daemons lack: None (and not asked again) when unknown."""
        if kind in self._unsupported:
            return None
        try:
            return await self.source.request(kind, **args)
        except RequestError as exc:
            if exc.code not in ("unknown_request", "not_recorded"):
                raise
            self._unsupported.add(kind)
            return None

    # actions --------------------------------------------------------------------
    def current_job(self) -> str | None:
        screen = self._data_screen()
        return screen.current_job() if screen is not None else None

    def action_open_job(self, name: str | None = None) -> None:
        job = name or self.current_job()
        if job is None:
            return
        self.push_screen(JobScreen(self.state, self.source.now, job, self.reload_job))
        self.reload_job(job, JOB_PARTS)

    def action_gpu_map(self) -> None:
        """`m` opens the GPU map; on the map it goes back."""
        if isinstance(self.screen, GpuMapScreen):
            self.pop_screen()
            return
        if isinstance(self.screen, StateScreen):
            self.push_screen(GpuMapScreen(self.state, self.source.now))
            self.schedule_queue()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections: list[tuple[str, Iterable[Any]]] = [
            ("Everywhere", self.BINDINGS),
            (
                "Dashboard",
                [
                    Binding("enter", "", "open the highlighted job"),
                    Binding("up,down", "", "choose a job"),
                ],
            ),
            (
                "Job screen",
                [
                    Binding("escape", "", "back to the dashboard"),
                    Binding("1,2,3,4", "", "tabs: curves, checkpoints, events, log"),
                ],
            ),
            ("Log tab", LogView.BINDINGS),
            ("GPU map (m)", [Binding("escape,m", "", "back")]),
            ("Command palette", [Binding("ctrl+p", "", "every action, searchable")]),
        ]
        self.push_screen(HelpScreen(sections))

    def _confirm_then(
        self,
        title: str,
        body: str,
        confirm: str,
        kind: str,
        done: str,
        *,
        dangerous: bool = False,
        **args: Any,
    ) -> None:
        job = self.current_job()
        if job is None:
            self.notify("No job selected.", severity="warning")
            return

        def answered(ok: bool | None) -> None:
            if ok:
                self._spawn(self._send(kind, done.format(job=job), job=job, **args), "actions")

        self.push_screen(
            ConfirmScreen(
                title.format(job=job), body.format(job=job), confirm, dangerous=dangerous
            ),
            answered,
        )

    async def _send(self, kind: str, done: str, **args: Any) -> None:
        self.actions_sent.append((kind, args))
        try:
            await self.source.request(kind, **args)
        except NotConnected as exc:
            self.notify(f"Not sent: the daemon is not reachable ({exc}).", severity="error")
            return
        except RequestError as exc:
            self.notify(exc.message, title=f"{kind} refused", severity="error", timeout=8)
            return
        self.notify(done)
        self.schedule_refetch()

    def action_stop_job(self) -> None:
        self._confirm_then(
            "Stop {job} gracefully?",
            "The trainer gets SIGTERM, saves a checkpoint at the next step and exits; "
            "after the job's stop_grace it is killed. It is not restarted.",
            "Stop",
            RequestType.STOP,
            "Stopping {job} (graceful).",
            now=False,
        )

    def action_kill_job(self) -> None:
        self._confirm_then(
            "Kill {job} now?",
            "SIGKILL to the trainer's whole process group: no checkpoint is saved; work "
            "since the last checkpoint is lost. It is not restarted.",
            "Kill",
            RequestType.STOP,
            "Killed {job}.",
            dangerous=True,
            now=True,
        )

    def action_restart_job(self) -> None:
        self._confirm_then(
            "Restart {job}?",
            "A running trainer is stopped gracefully (it saves a checkpoint) and started "
            "again from the newest valid checkpoint; a finished or failed job starts again.",
            "Restart",
            RequestType.RESTART,
            "Restarting {job}.",
        )

    def action_save_job(self) -> None:
        self._confirm_then(
            "Save a checkpoint of {job} now?",
            "The trainer is asked (SIGUSR2) to save at the next step boundary; training goes on.",
            "Save",
            RequestType.SAVE,
            "Asked {job} to save a checkpoint.",
        )

    def action_start_job(self) -> None:
        self.push_screen(StartJobScreen(), self._start_from)

    def _start_from(self, path: str | None) -> None:
        if path:
            self._spawn(self._start(Path(path).expanduser()), "actions")

    async def _start(self, path: Path) -> None:
        try:
            text = await asyncio.to_thread(path.read_text)
        except (OSError, UnicodeDecodeError) as exc:
            self.notify(f"Cannot read {path}: {exc}", severity="error")
            return
        await self._send(
            RequestType.START,
            f"Submitted {path.name}.",
            spec_path=str(path.absolute()),
            spec_text=text,
        )

    # command palette ------------------------------------------------------------
    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        job = self.current_job()
        on = f" ({job})" if job else ""
        yield SystemCommand(
            f"Stop job gracefully{on}", "SIGTERM, save, exit; no restart", self.action_stop_job
        )
        yield SystemCommand(f"Kill job{on}", "SIGKILL now; no checkpoint", self.action_kill_job)
        yield SystemCommand(
            f"Restart job{on}", "from the newest valid checkpoint", self.action_restart_job
        )
        yield SystemCommand(
            f"Save a checkpoint now{on}", "ask the trainer to save", self.action_save_job
        )
        yield SystemCommand(
            "Start a job from a job file", "ftsup start JOB.toml", self.action_start_job
        )
        yield SystemCommand(
            "GPU map and queue", "who holds which GPU; who waits, and why", self.action_gpu_map
        )
        for name in sorted(self.state.jobs):
            yield SystemCommand(
                f"Open job {name}",
                "curves, checkpoints, events, log",
                partial(self.action_open_job, name),
                discover=False,
            )
        yield SystemCommand("Help", "every key", self.action_help)
        yield from super().get_system_commands(screen)
