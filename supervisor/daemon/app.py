"""`ftsup daemon`: wires the store, the jobs, the socket, and the signal handling.

SIGTERM/SIGINT stop the daemon, never the runs: shims keep them alive and the
next daemon re-adopts them. Only one daemon per state folder (a lock says so).
The state and runtime folders must be the daemon user's own and private
(`private_dirs`); whatever the daemon writes there is 0600 whatever the umask.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from ftsup.supervisor import __version__, nofile
from ftsup.supervisor.contract import (
    DAEMON_LOCK_NAME,
    ENV_RUNTIME_DIR,
    ENV_SIMULATE_GPUS,
    ENV_STATE_DIR,
)
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.gpus import GpuSupervision
from ftsup.supervisor.daemon.handlers import Handlers
from ftsup.supervisor.daemon.launcher import default_env
from ftsup.supervisor.daemon.manager import JobManager
from ftsup.supervisor.daemon.placement import foreign_memory, views_from_monitor
from ftsup.supervisor.daemon.server import SocketServer
from ftsup.supervisor.daemon.services import DaemonServices, MetricsOptions
from ftsup.supervisor.health import simulated
from ftsup.supervisor.health.nvml import Nvml
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.private_dirs import (
    NotPrivate,
    ensure_private_dir,
    open_private,
    set_daemon_umask,
    tighten_file,
)
from ftsup.supervisor.service.logging_setup import setup_daemon_logging
from ftsup.supervisor.spec import SpecError, load_daemon_config
from ftsup.supervisor.spec_types import DaemonConfig
from ftsup.supervisor.store import Store

log = logging.getLogger("ftsup.daemon")


class DaemonAlreadyRunning(Exception):
    pass


class Daemon:
    def __init__(
        self,
        layout: Layout,
        metrics: MetricsOptions | None = None,
        nvml: Nvml | None = None,
    ) -> None:
        self.layout = layout
        self.metrics = metrics or MetricsOptions()
        self.nvml = nvml  # None: the real pynvml or FTSUP_SIMULATE_GPUS (tests: a double)
        self.config = DaemonConfig()
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None

    def _secure_folders(self) -> None:
        """Refuse folders that are not ours (NotPrivate); make ours and the state
        files already in them private (a state folder from before this check)."""
        ensure_private_dir(self.layout.state_dir, env_var=ENV_STATE_DIR)
        ensure_private_dir(self.layout.runtime_dir, env_var=ENV_RUNTIME_DIR)
        self._tighten_db()
        tighten_file(self.layout.daemon_log)
        for job_file in self.layout.state_dir.glob("runs/*/job.toml"):
            tighten_file(job_file)

    def _tighten_db(self) -> None:
        """The database 0600 (SQLite gives a new -wal and -shm the database's mode)."""
        db = self.layout.db
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            tighten_file(path)

    def _take_instance_lock(self) -> None:
        fd = open_private(self.layout.state_dir / DAEMON_LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonAlreadyRunning(
                f"another ftsup daemon uses {self.layout.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def hello_info(self) -> dict[str, Any]:
        return {
            "daemon_pid": os.getpid(),
            "daemon_version": __version__,
            "started_at": self.started_at,
            "state_dir": str(self.layout.state_dir),
        }

    def request_shutdown(self) -> None:
        self._stop.set()

    def _gpu_module(self) -> Nvml | None:
        """The injected NVML module, else simulated GPUs when FTSUP_SIMULATE_GPUS asks
        for them (SimulationError: refuse to start), else None (the real pynvml)."""
        if self.nvml is not None:
            return self.nvml
        gpus = simulated.from_env(os.environ)
        if gpus is not None:
            log.warning(
                "GPUs are simulated (%s=%s): %s; `ftsup gpus simulate-xid` injects XIDs",
                ENV_SIMULATE_GPUS,
                os.environ[ENV_SIMULATE_GPUS],
                gpus.describe(),
            )
        return gpus

    async def run(self) -> None:
        self.config = load_daemon_config(self.layout.daemon_config)  # SpecError: refuse to start
        nvml = self._gpu_module()
        self._secure_folders()
        self._take_instance_lock()
        if _socket_answers(self.layout):
            raise DaemonAlreadyRunning(f"a daemon already answers on {self.layout.socket}")
        store = Store(self.layout.db)
        self._tighten_db()  # created just now under an in-process caller's umask
        bus = EventBus(store)
        manager = JobManager(
            store, bus, self.layout, default_env(), spares=self.config.standby.spares
        )
        gpus = GpuSupervision(bus, manager.runners, nvml)
        manager.preflight = gpus.preflight
        manager.placement.gpu_views = lambda: views_from_monitor(gpus.monitor, gpus.groups)
        manager.placement.foreign_memory = lambda: foreign_memory(gpus, manager.runners)
        manager.placement.foreign_limit_mib = self.config.gpu.foreign_memory_limit >> 20
        manager.placement.regrow = lambda job, why: _regrow(manager, job, why)
        handlers = Handlers(manager, store, self.layout, self.request_shutdown, gpus)
        server = SocketServer(self.layout.socket, handlers.table(), bus, self.hello_info)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
        gpu_status = await gpus.start()
        manager.restore()
        manager.start_pump()
        await server.start()
        services = DaemonServices(manager, bus, self.metrics, self.config.notify)
        services.start()  # READY=1: the socket is bound and every run re-adopted
        bus.emit(
            None,
            "daemon_started",
            f"daemon {os.getpid()} listening on {self.layout.socket}; {gpu_status}",
        )
        log.info("listening on %s (state in %s)", self.layout.socket, self.layout.state_dir)
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down; running jobs keep running")
            await services.close()
            await server.close()
            await manager.close()
            await gpus.close()
            store.close()


def _regrow(manager: JobManager, job: str, why: str) -> None:
    runner = manager.runners.get(job)
    if runner is not None:
        runner.request_regrow(why)


def _socket_answers(layout: Layout) -> bool:
    if not layout.socket.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(layout.socket))
        except OSError:
            return False
    return True


def run_daemon(layout: Layout, metrics: MetricsOptions | None = None) -> int:
    setup_daemon_logging(logging.INFO)
    set_daemon_umask()  # state files 0600 whatever the user's umask; trainers get theirs back
    old, new = nofile.raise_for_daemon()  # shims give trainers the old one back
    if new != old:
        log.info("raised the open-file limit from %d to %d", old, new)
    try:
        asyncio.run(Daemon(layout, metrics).run())
    except NotPrivate as exc:
        log.error("refusing to start: %s", exc)
        return 5
    except DaemonAlreadyRunning as exc:
        log.error("%s", exc)
        return 5
    except SpecError as exc:
        log.error("invalid daemon configuration:\n%s", exc)
        return 2
    except simulated.SimulationError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    return 0
