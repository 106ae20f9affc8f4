"""The Prometheus endpoint on an ephemeral loopback port, scraped over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request

import prometheus_client  # noqa: F401  (a dev dependency: missing is a broken install)
import pytest

from ftsup.supervisor.service.metrics import (
    GpuMetrics,
    JobMetrics,
    Snapshot,
    start_metrics_server,
    with_goodput,
)


def scrape(url: str) -> list[str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode().splitlines()


GOODPUT = {
    "goodput": 0.871,
    "wall_s": 142.875,
    "productive_s": 124.5,
    "checkpoint_stall_s": 0.875,
    "recomputed_s": 7.0,
    "restart_downtime_s": 10.5,
    "checkpoint_advice": {"recommended_steps": 11, "configured_steps": 20},
}


def test_serves_a_running_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    steps = iter(range(120, 200, 10))

    def snapshot() -> Snapshot:
        job = with_goodput(
            JobMetrics(
                name="qwen-lora",
                state="running",
                step=next(steps),
                max_steps=3000,
                loss=1.25,
                restarts=2,
                seconds_since_checkpoint=42.5,
            ),
            GOODPUT,  # as `ftsup status --json` reports it
            {"state": "ready", "pid": 7, "ready_s": 4.0, "since": 1.0},
        )
        idle = JobMetrics(name="queued-job", state="waiting")
        gpu = GpuMetrics(
            index=0,
            name="NVIDIA H100",
            utilization_percent=97.0,
            memory_used_bytes=70 * 2**30,
            memory_total_bytes=80 * 2**30,
            temperature_celsius=64.0,
            power_watts=612.5,
        )
        return Snapshot(jobs=[job, idle], gpus=[gpu])

    server = start_metrics_server(snapshot, port=0)
    try:
        assert server.address == "127.0.0.1" and server.port > 0
        lines = scrape(server.url)
        again = scrape(server.url)
    finally:
        server.close()
    for expected in (
        "ftsup_snapshot_ok 1.0",
        'ftsup_job_state{job_name="qwen-lora",state="running"} 1.0',
        'ftsup_job_state{job_name="queued-job",state="waiting"} 1.0',
        'ftsup_job_step{job_name="qwen-lora"} 120.0',
        'ftsup_job_max_steps{job_name="qwen-lora"} 3000.0',
        'ftsup_job_loss{job_name="qwen-lora"} 1.25',
        'ftsup_job_restarts_total{job_name="qwen-lora"} 2.0',
        'ftsup_job_seconds_since_checkpoint{job_name="qwen-lora"} 42.5',
        'ftsup_job_goodput{job_name="qwen-lora"} 0.871',
        'ftsup_job_time_seconds{job_name="qwen-lora",part="productive"} 124.5',
        'ftsup_job_time_seconds{job_name="qwen-lora",part="checkpoint_stall"} 0.875',
        'ftsup_job_time_seconds{job_name="qwen-lora",part="recomputed"} 7.0',
        'ftsup_job_time_seconds{job_name="qwen-lora",part="restart_downtime"} 10.5',
        'ftsup_job_advised_checkpoint_steps{job_name="qwen-lora"} 11.0',
        'ftsup_job_standby_ready{job_name="qwen-lora"} 1.0',
        'ftsup_gpu_utilization_percent{gpu="0",name="NVIDIA H100"} 97.0',
        'ftsup_gpu_temperature_celsius{gpu="0",name="NVIDIA H100"} 64.0',
        'ftsup_gpu_power_watts{gpu="0",name="NVIDIA H100"} 612.5',
    ):
        assert expected in lines, expected
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert float(samples['ftsup_gpu_memory_used_bytes{gpu="0",name="NVIDIA H100"}']) == 70 * 2**30
    assert float(samples['ftsup_gpu_memory_total_bytes{gpu="0",name="NVIDIA H100"}']) == 80 * 2**30
    assert "process_resident_memory_bytes" in samples  # the daemon's own process
    # Unknown values are absent, not NaN.
    assert not any(line.startswith('ftsup_job_loss{job_name="queued-job"') for line in lines)
    assert not any('job_name="queued-job"' in line for line in lines if "goodput" in line)
    assert not any('job_name="queued-job"' in line for line in lines if "standby" in line)
    assert 'ftsup_job_step{job_name="qwen-lora"} 130.0' in again  # fresh snapshot per scrape


def test_failing_snapshot_is_reported() -> None:
    def broken() -> Snapshot:
        raise RuntimeError("daemon state unavailable")

    server = start_metrics_server(broken, port=0)
    try:
        lines = scrape(server.url)
    finally:
        server.close()
    assert "ftsup_snapshot_ok 0.0" in lines


def test_clear_message_without_prometheus_client() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if the extra were not installed
        from ftsup.supervisor.service.metrics import MetricsUnavailable, Snapshot
        from ftsup.supervisor.service.metrics import start_metrics_server
        try:
            start_metrics_server(Snapshot, port=0)
        except MetricsUnavailable as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert "pip install 'ftsup[metrics]'" in done.stdout
