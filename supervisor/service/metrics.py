"""Optional Prometheus endpoint: per-job and per-GPU gauges from the daemon's snapshot.

Off by default, loopback by default (job names are not for the whole network).
`prometheus-client` is an optional extra, imported only when the endpoint is
started. Scrapes run on the server's own thread and only call `snapshot()`:
the daemon should hand over an immutable `Snapshot` it rebuilt on its loop,
never live state.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9836
INSTALL_HINT = "the Prometheus endpoint needs prometheus-client: pip install 'ftsup[metrics]'"


@dataclass(frozen=True)
class JobMetrics:
    name: str
    state: str
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    restarts: int = 0
    seconds_since_checkpoint: float | None = None
    goodput: float | None = None  # productive share of the wall time
    # (part, seconds): productive, checkpoint_stall, recomputed, restart_downtime
    time_split: Sequence[tuple[str, float]] = ()
    advised_checkpoint_steps: int | None = None  # Young/Daly
    standby_ready: bool | None = None  # None: the job keeps no warm standby now


@dataclass(frozen=True)
class GpuMetrics:
    index: int
    name: str = ""
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


@dataclass(frozen=True)
class Snapshot:
    jobs: Sequence[JobMetrics] = field(default_factory=tuple)
    gpus: Sequence[GpuMetrics] = field(default_factory=tuple)


SnapshotFn = Callable[[], Snapshot]

_TIME_PARTS = (
    ("productive", "productive_s"),
    ("checkpoint_stall", "checkpoint_stall_s"),
    ("recomputed", "recomputed_s"),
    ("restart_downtime", "restart_downtime_s"),
)


def with_goodput(
    job: JobMetrics, goodput: dict[str, Any] | None, standby: dict[str, Any] | None
) -> JobMetrics:
    """`job` plus the daemon's goodput report and standby state (their JSON forms)."""
    goodput = goodput or {}
    advice = goodput.get("checkpoint_advice") or {}
    return dataclasses.replace(
        job,
        goodput=goodput.get("goodput"),
        time_split=tuple(
            (part, float(goodput[key])) for part, key in _TIME_PARTS if goodput.get(key) is not None
        ),
        advised_checkpoint_steps=advice.get("recommended_steps"),
        standby_ready=None if standby is None else standby.get("state") == "ready",
    )


class MetricsUnavailable(RuntimeError):
    """prometheus-client is not installed."""


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise MetricsUnavailable(INSTALL_HINT) from exc
    return prometheus_client


# (metric name, help, attribute); None values are left out rather than exported as NaN.
# The label is `job_name`, not `job`: Prometheus sets `job` on every target itself.
_JOB_GAUGES = (
    ("ftsup_job_step", "Last reported training step.", "step"),
    ("ftsup_job_max_steps", "Planned training steps.", "max_steps"),
    ("ftsup_job_loss", "Last reported training loss.", "loss"),
    (
        "ftsup_job_seconds_since_checkpoint",
        "Seconds since the newest valid checkpoint was written.",
        "seconds_since_checkpoint",
    ),
    ("ftsup_job_goodput", "Share of the job's wall time that was productive training.", "goodput"),
    (
        "ftsup_job_advised_checkpoint_steps",
        "Checkpoint interval in steps that the Young/Daly rule advises.",
        "advised_checkpoint_steps",
    ),
    (
        "ftsup_job_standby_ready",
        "1 when a warm standby is ready, 0 while it warms.",
        "standby_ready",
    ),
)
_GPU_GAUGES = (
    ("ftsup_gpu_utilization_percent", "GPU utilization.", "utilization_percent"),
    ("ftsup_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("ftsup_gpu_memory_total_bytes", "GPU memory in total.", "memory_total_bytes"),
    ("ftsup_gpu_temperature_celsius", "GPU temperature.", "temperature_celsius"),
    ("ftsup_gpu_power_watts", "GPU power draw.", "power_watts"),
)


class SnapshotCollector:
    """A prometheus-client collector that turns one `Snapshot` into metric families."""

    def __init__(self, snapshot: SnapshotFn) -> None:
        self._snapshot = snapshot
        self._core = _prometheus().core

    def collect(self) -> Iterator[Any]:
        core = self._core
        ok = core.GaugeMetricFamily("ftsup_snapshot_ok", "1 when the daemon's snapshot was read.")
        try:
            snap = self._snapshot()
        except Exception:
            log.exception("metrics snapshot failed")
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from self._jobs(snap.jobs)
        yield from self._gpus(snap.gpus)

    def _jobs(self, jobs: Sequence[JobMetrics]) -> Iterator[Any]:
        core = self._core
        state = core.GaugeMetricFamily(
            "ftsup_job_state", "1 for the job's current state.", labels=["job_name", "state"]
        )
        restarts = core.CounterMetricFamily(
            "ftsup_job_restarts", "Restarts of the job so far.", labels=["job_name"]
        )
        split = core.GaugeMetricFamily(
            "ftsup_job_time_seconds",
            "The job's wall time so far, by part.",
            labels=["job_name", "part"],
        )
        for job in jobs:
            state.add_metric([job.name, job.state], 1)
            restarts.add_metric([job.name], job.restarts)
            for part, seconds in job.time_split:
                split.add_metric([job.name, part], seconds)
        yield state
        yield restarts
        yield split
        for name, doc, attr in _JOB_GAUGES:
            family = core.GaugeMetricFamily(name, doc, labels=["job_name"])
            for job in jobs:
                if (value := getattr(job, attr)) is not None:
                    family.add_metric([job.name], float(value))
            yield family

    def _gpus(self, gpus: Sequence[GpuMetrics]) -> Iterator[Any]:
        for name, doc, attr in _GPU_GAUGES:
            family = self._core.GaugeMetricFamily(name, doc, labels=["gpu", "name"])
            for gpu in gpus:
                if (value := getattr(gpu, attr)) is not None:
                    family.add_metric([str(gpu.index), gpu.name], float(value))
            yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The running endpoint; `close()` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    snapshot: SnapshotFn, *, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT
) -> MetricsServer:
    """Serve `/metrics` on `address:port` in a thread (port 0: any free port).

    Raises `MetricsUnavailable` without prometheus-client, OSError if the port is taken.
    """
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    prometheus.ProcessCollector(registry=registry)  # the daemon's own CPU, memory, fds
    if not _is_loopback(address):
        log.warning("metrics endpoint on %s is reachable beyond this machine", address)
    server_class = _ThreadingWSGIServer6 if ":" in address else _ThreadingWSGIServer
    server = make_server(
        address,
        port,
        prometheus.make_wsgi_app(registry),
        server_class=server_class,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(
        target=server.serve_forever, args=(0.2,), name="ftsup-metrics", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
