"""`serve` as a user runs it: real broker, real worker processes (simulated executors, named
as such), real sockets. Starts, reports, restarts crashed workers, stops leaving nothing."""

import asyncio
import json
import os
import signal
import threading
import urllib.request

import pytest

from clients.client import AsyncBrokerClient, BrokerClient
from tests.serve.conftest import cli, free_port, gone, start_long_job, wait_for

pytestmark = pytest.mark.slow


def _status(endpoint: str) -> dict:
    with BrokerClient(endpoint, timeout_s=5.0, retries=1) as client:
        return client.status()


def test_serve_starts_shows_every_worker_and_stops_leaving_nothing(start_serve, tmp_path):
    frontend = f"ipc://{tmp_path}/fe.sock"
    backend = f"ipc://{tmp_path}/be.sock"
    metrics_port = free_port()
    sp = start_serve(["--frontend", frontend, "--backend", backend, "--sim-workers", "2",
                      "--sim-step-s", "0.1", "--state-dir", str(tmp_path / "state"), "--metrics-port", str(metrics_port),
                      "--local-frontend", f"ipc://{tmp_path}/local.sock"])
    assert sp.endpoint == frontend
    children = sp.children()
    assert len(children) == 2

    # the people's table: one row per worker, its state
    table = cli("status", "--endpoint", frontend, timeout_s=30)
    assert table.returncode == 0, table.stderr
    for worker_id in ("sim-0", "sim-1"):
        assert worker_id in table.stdout
    assert "idle" in table.stdout

    # the same through --json and through the asyncio client
    as_json = json.loads(cli("status", "--endpoint", frontend, "--json").stdout)
    assert {w["pid"] for w in as_json["workers"]} == set(children)

    async def async_status():
        async with AsyncBrokerClient(frontend, timeout_s=5.0) as client:
            return await client.status()
    assert sorted(w["worker_id"] for w in asyncio.run(async_status())["workers"]) == ["sim-0", "sim-1"]
    # the plain local frontend answers too (it is meant for tools beside a CURVE frontend)
    local = json.loads(cli("status", "--endpoint", f"ipc://{tmp_path}/local.sock", "--json").stdout)
    assert sorted(w["worker_id"] for w in local["workers"]) == ["sim-0", "sim-1"]

    # a job moves the counters a Prometheus scrape sees
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()
    assert "sdxl_broker_jobs_accepted_total 0.0" in scrape()
    with BrokerClient(frontend, timeout_s=10.0) as client:
        client.generate(prompt="a fox", model_base="tiny-sdxl", steps=2, width=256, height=256)
    metrics = scrape()
    assert 'sdxl_broker_jobs_finished_total{outcome="completed"} 1.0' in metrics
    assert 'sdxl_worker_memory_total_bytes{device="cpu",worker_id="sim-1"}' in metrics

    # load / cleanup / cancel from the terminal
    loaded = cli("load", "tiny-sdxl", "--endpoint", frontend)
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["model"] == "tiny-sdxl", loaded.stderr
    cleaned = cli("cleanup", "--worker", "sim-0", "--endpoint", frontend)
    assert cleaned.returncode == 0 and list(json.loads(cleaned.stdout)["workers"]) == ["sim-0"]
    refused = cli("cancel", "no-such-job", "--endpoint", frontend)
    assert refused.returncode == 1 and "no-such-job" in refused.stderr
    # cancel a running job from the terminal: on the main frontend another connection's job is
    # refused, saying how; on the local frontend (the operator's) it is cancelled and its
    # caller gets `cancelled`
    job, running, outcome = start_long_job(frontend, client_timeout_s=10.0)
    assert running.wait(20)
    refused = cli("cancel", "to-cancel", "--endpoint", frontend)
    assert refused.returncode == 1 and "error (forbidden)" in refused.stderr, refused.stderr
    assert "Ctrl-C in the `sdxl-broker generate`" in refused.stderr
    assert "--allow-local-cancel" in refused.stderr
    cancelled = cli("cancel", "to-cancel", "--endpoint", f"ipc://{tmp_path}/local.sock")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["cancelled"] is True
    job.join(20)
    assert outcome["reply"]["error_code"] == "cancelled"

    invalid = cli("generate", "a fox", "--model", "tiny-sdxl", "--steps", "999", "--size", "100x256",
                  "--endpoint", frontend)
    assert invalid.returncode == 1 and "validation_error" in invalid.stderr
    assert "steps" in invalid.stderr and "width" in invalid.stderr  # every problem, by field

    # the client sends the other two forms as ready-made bodies; replies come in their form
    nested = {"message_type": "inference_request", "request_id": "nested-1",
              "data": {"prompt": "a fox", "model_name": "tiny-sdxl",
                       "hyperparameters": {"num_inference_steps": 2},
                       "dimensions": {"width": 256, "height": 256}}}
    legacy = {"action": "generate", "session_id": "legacy-1",
              "prompt_submission": {"model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "a fox"},
                                    "hyperparameters": {"width": 256, "height": 256, "steps": 2}}}
    with BrokerClient(frontend, timeout_s=10.0, codec_name="json") as client:
        for body, reply_type in ((nested, "inference_response"), (legacy, "generate_response")):
            result = client.generate(body)
            assert result.reply["message_type"] == reply_type
            assert len(result.images) == 1

    assert sp.stop(signal.SIGTERM) == 0
    assert all(gone(pid) for pid in children)
    assert not os.path.exists(tmp_path / "fe.sock") and not os.path.exists(tmp_path / "be.sock")
    assert not os.path.exists(tmp_path / "local.sock")
    assert sp.stdout_lines == [f"ready {frontend}\n"]  # exactly one line on stdout


def test_killed_worker_is_restarted_and_its_job_rerun(start_serve):
    metrics_port = free_port()
    sp = start_serve(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                      "--sim-workers", "1", "--sim-step-s", "0.2", "--sim-load-s", "0.1",
                      "--heartbeat-interval-s", "0.3", "--metrics-port", str(metrics_port)])
    old_pid = _status(sp.endpoint)["workers"][0]["pid"]
    denoising = threading.Event()
    events, outcome = [], {}

    def on_progress(event):
        events.append(event)
        if event.get("stage") == "denoising":
            denoising.set()

    def run_job():
        with BrokerClient(sp.endpoint, timeout_s=5.0, retries=5) as client:
            outcome["result"] = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=12,
                                                width=256, height=256, on_progress=on_progress)

    thread = threading.Thread(target=run_job, daemon=True)
    thread.start()
    assert denoising.wait(20), sp.log()
    os.kill(old_pid, signal.SIGKILL)
    thread.join(60)
    assert "result" in outcome, sp.log()
    reply = outcome["result"].reply
    assert reply["success"] is True
    assert len(reply["data"]["generated_images"]) == 1
    # the worker came back under its id with a new pid, and the job ran again from step 1
    worker = _status(sp.endpoint)["workers"][0]
    assert worker["worker_id"] == "sim-0" and worker["pid"] != old_pid
    assert any("sim-0" in line and "restarting" in line for line in sp.stderr_lines)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert 'sdxl_worker_restarts_total{worker_id="sim-0"} 1.0' in r.read().decode()
    steps = [e["step"] for e in events if e.get("stage") == "denoising"]
    assert any(later <= earlier for earlier, later in zip(steps, steps[1:])), steps  # restarted
    assert sp.stop(signal.SIGINT) == 0  # Ctrl-C drains and stops like SIGTERM


def test_client_survives_a_broker_restart_mid_request(start_serve, tmp_path):
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    argv = ["--frontend", frontend, "--backend", backend, "--sim-workers", "1",
            "--sim-step-s", "0.25", "--sim-load-s", "0.1", "--state-dir", str(tmp_path / "state")]
    first = start_serve(argv)
    denoising = threading.Event()
    outcome = {}

    def run_job():
        # Lazy Pirate: 1 s of silence -> close, reopen, resend the same request_id
        with BrokerClient(frontend, timeout_s=1.0, retries=40) as client:
            outcome["result"] = client.generate(
                prompt="a fox", model_base="tiny-sdxl", steps=12, width=256, height=256,
                request_id="survives-restart",
                on_progress=lambda e: e.get("stage") == "denoising" and denoising.set())

    thread = threading.Thread(target=run_job, daemon=True)
    thread.start()
    assert denoising.wait(20), first.log()
    children = first.children()
    first.proc.send_signal(signal.SIGKILL)  # the broker dies without any goodbye
    first.proc.wait(10)
    assert wait_for(lambda: all(gone(pid) for pid in children), 10), "worker outlived serve"

    second = start_serve(argv)
    thread.join(60)
    assert "result" in outcome, second.log()
    reply = outcome["result"].reply
    assert reply["success"] is True and reply["request_id"] == "survives-restart"
    assert second.stop() == 0


def test_serve_on_a_busy_port_exits_with_a_clear_error(tmp_path):
    import zmq

    ctx = zmq.Context()
    squatter = ctx.socket(zmq.ROUTER)
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    try:
        done = cli("serve", "--frontend", f"tcp://127.0.0.1:{port}", "--backend", "tcp://127.0.0.1:*",
                   "--sim-workers", "1", timeout_s=60)
    finally:
        squatter.close(linger=0)
        ctx.term()
    assert done.returncode == 1
    assert "Address already in use" in done.stderr and "cannot start the broker" in done.stderr
    assert "ready" not in done.stdout
