"""Prometheus metrics as an operator scrapes them: `sdxl-broker broker --metrics-port` and one
`sdxl-broker worker --sim` (a SIMULATED executor) as real processes, jobs sent by the Python
client, /metrics read over HTTP. Plus the missed-heartbeat counter on an in-process Broker with
a raw DEALER that registers and then goes silent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.server import Broker, BrokerConfig
from clients.client import BrokerClient
from protocol import worker_protocol as W
from tests.serve.conftest import ROOT, free_port, stop_processes, wait_for


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of one /metrics scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    stop_processes(started, timeout_s=15)


@pytest.mark.slow
def test_scrape_shows_outcomes_error_codes_latency_queue_and_cache(processes, tmp_path):
    frontend, backend = f"ipc://{tmp_path}/fe.sock", f"ipc://{tmp_path}/be.sock"
    port = free_port()
    broker = _spawn(["broker", "--frontend", frontend, "--backend", backend, "--metrics-port",
                     str(port), "--log-format", "json", "--heartbeat-interval-s", "0.2"])
    processes.append(broker)
    assert broker.stdout.readline().startswith("ready "), broker.stderr.read()
    worker = _spawn(["worker", "--connect", backend, "--device", "cpu", "--worker-id", "sim-m",
                     "--sim", "--sim-load-s", "0.05", "--sim-step-s", "0.05",
                     "--heartbeat-interval-s", "0.2"])
    processes.append(worker)
    with BrokerClient(frontend, timeout_s=10.0) as client:
        assert wait_for(lambda: [w["worker_id"] for w in client.status()["workers"]] == ["sim-m"])

        before = scrape(port)
        assert value(before, "sdxl_broker_queue_depth_by_priority", priority="high") == 0.0
        assert value(before, "sdxl_worker_cache_hits_total", worker_id="sim-m", device="cpu") == 0.0

        # one success, then a second on the warm model (a cache hit)
        for rid in ("ok-1", "ok-2"):
            client.generate(prompt="a fox", model_base="tiny-sdxl", steps=2, width=256,
                            height=256, request_id=rid)
        # one validation error: refused before it is queued
        invalid = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=999,
                                  raise_on_error=False, request_id="bad-1").reply
        assert invalid["error_code"] == "validation_error"
        # one cancelled while running, by the connection that submitted it
        with client.generation(prompt="slow", model_base="tiny-sdxl", steps=150, width=256,
                               height=256, request_id="to-cancel") as job:
            for message in job:
                if message.get("stage") == "denoising":
                    break
            assert job.cancel()["data"]["cancelled"] is True
            assert [m for m in job][-1]["error_code"] == "cancelled"

        # the worker's next heartbeat carries its cache counters
        assert wait_for(lambda: client.status()["workers"][0]["cache_hits"] >= 2, timeout_s=5)

    after = scrape(port)
    assert value(after, "sdxl_broker_replies_total", outcome="completed", error_code="") == 2.0
    assert value(after, "sdxl_broker_replies_total", outcome="rejected",
                 error_code="validation_error") == 1.0
    assert value(after, "sdxl_broker_replies_total", outcome="cancelled",
                 error_code="cancelled") == 1.0
    assert value(after, "sdxl_broker_replies_total", outcome="failed", error_code="cancelled") is None
    # latency histograms: every accepted job once in total (by outcome), dispatched ones in
    # queue, completed ones in inference (the simulated 2 steps take >= 0.1 s)
    assert value(after, "sdxl_broker_job_total_seconds_count", outcome="completed") == 2.0
    assert value(after, "sdxl_broker_job_total_seconds_count", outcome="cancelled") == 1.0
    assert value(after, "sdxl_broker_job_queue_seconds_count") == 3.0
    assert value(after, "sdxl_broker_job_inference_seconds_count") == 2.0
    assert value(after, "sdxl_broker_job_inference_seconds_sum") >= 0.1
    assert value(after, "sdxl_broker_job_inference_seconds_bucket", le="0.05") == 0.0
    assert value(after, "sdxl_broker_job_total_seconds_sum", outcome="completed") >= \
        value(after, "sdxl_broker_job_inference_seconds_sum")
    # queue per priority (empty again) and the simulated worker's cache counters
    for priority in ("high", "normal", "low"):
        assert value(after, "sdxl_broker_queue_depth_by_priority", priority=priority) == 0.0
    worker_labels = {"worker_id": "sim-m", "device": "cpu"}
    assert value(after, "sdxl_worker_cache_misses_total", **worker_labels) == 1.0  # first load
    assert value(after, "sdxl_worker_cache_hits_total", **worker_labels) >= 2.0
    assert value(after, "sdxl_worker_cache_evictions_total", **worker_labels) == 0.0
    # inflow and outcomes are separate counters (a sum over either counts each job once)
    assert value(after, "sdxl_broker_jobs_accepted_total") == 3.0
    assert value(after, "sdxl_broker_jobs_finished_total", outcome="completed") == 2.0
    assert value(after, "sdxl_broker_jobs_finished_total", outcome="cancelled") == 1.0

    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=20) == 0
    # --log-format json: every stderr line is one JSON object
    lines = [line for line in broker.stderr.read().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)
    assert any("accepting on" in json.loads(line)["message"] for line in lines)


def test_worker_that_stops_heart_beating_counts_a_missed_heartbeat(tmp_path):
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/fe.sock",
                                 backend=f"ipc://{tmp_path}/be.sock",
                                 heartbeat_interval_s=0.05, heartbeat_liveness=2))
    broker.start()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker.backend_endpoint)
        dealer.send(W.encode(W.Ready(worker_id="silent", device="cpu")))
        assert wait_for(lambda: [w["state"] for w in broker.status()["workers"]] == ["lost"],
                        timeout_s=5)
        # what /metrics would serve from this broker's registry
        text = generate_latest(broker.metrics.registry).decode()
        assert 'sdxl_broker_missed_heartbeats_total{worker_id="silent"} 1.0' in text
    finally:
        ctx.destroy(linger=0)
        broker.stop()


def test_real_pipeline_cache_counts_hits_misses_and_evictions():
    torch = pytest.importorskip("torch")
    from gpu_worker.pipeline_cache import PipelineCache

    def module():  # 1 MiB of float32 weights
        return torch.nn.Linear(512, 512, bias=False)

    cache = PipelineCache(budget_mb=1.5)
    cache.get_or_load(("a",), "a", "base", module, pin=False)
    cache.get_or_load(("a",), "a", "base", module, pin=False)
    cache.get_or_load(("b",), "b", "base", module, pin=False)  # over budget: evicts a
    snapshot = cache.snapshot()
    assert (snapshot["cache_hits"], snapshot["cache_misses"], snapshot["cache_evictions"]) == (1, 2, 1)
    assert [m["name"] for m in snapshot["models_loaded"]] == ["b"]


def promtool() -> str:
    """The promtool binary (Debian package `prometheus`), installed here when missing and root."""
    import shutil

    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                       env=env, capture_output=True, timeout=600)
        found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus) and cannot be installed "
                    "here (not root or no apt-get); .ci/run installs it")
    return found


@pytest.mark.slow
def test_serve_metrics_pass_promtool_and_count_what_an_operator_needs(start_serve, tmp_path):
    port = free_port()
    sp = start_serve(["--frontend", f"ipc://{tmp_path}/fe.sock", "--backend", f"ipc://{tmp_path}/be.sock",
                      "--sim-workers", "1", "--sim-step-s", "0.01", "--sim-load-s", "0.05",
                      "--metrics-port", str(port)])
    with BrokerClient(sp.endpoint, timeout_s=10.0) as client:
        client.generate(prompt="a fox", model_base="tiny-sdxl", steps=5, batch_size=2, width=256, height=256)
        client.generate(prompt="a fox", model_base="tiny-sdxl", steps=3, width=256, height=256)
        assert wait_for(lambda: client.status()["workers"][0]["jobs_done"] == 2, timeout_s=10)
        assert wait_for(lambda: client.status()["workers"][0]["load_time_s"], timeout_s=10)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout + checked.stderr
    samples = scrape(port)
    worker = {"worker_id": "sim-0", "device": "cpu"}
    assert value(samples, "sdxl_broker_jobs_accepted_total") == 2.0
    assert value(samples, "sdxl_broker_jobs_finished_total", outcome="completed") == 2.0
    assert value(samples, "sdxl_broker_images_total", worker_id="sim-0") == 3.0
    assert value(samples, "sdxl_broker_denoising_steps_total", worker_id="sim-0") == 5 * 2 + 3
    assert value(samples, "sdxl_worker_memory_total_bytes", **worker) == 8000.0 * 2**20  # sim telemetry
    assert value(samples, "sdxl_worker_resident_memory_bytes", **worker) > 10 * 2**20
    assert value(samples, "sdxl_worker_model_load_duration_seconds", model="tiny-sdxl", **worker) >= 0.05
    assert abs(value(samples, "sdxl_worker_last_heartbeat_timestamp_seconds", **worker) - time.time()) < 30
    assert value(samples, "sdxl_broker_workers_given_up") == 0.0
    assert not [name for name, _ in samples if name.endswith("_mb")]
    assert sp.stop() == 0
