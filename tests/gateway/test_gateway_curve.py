"""`sdxl-broker gateway` as a CURVE client: a real `serve` whose frontend requires CURVE (its
workers SIMULATED, named as such: only the connection matters here), and real gateway processes
started with the client flags every other client command takes (--curve-server-key,
--curve-client-key). An authorised key generates over HTTP; a key the broker does not allow
gets nothing, and half a key configuration is refused at start."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from runtime.curve import make_keys
from tests.serve.conftest import ROOT, ServeProcess, free_port, stop_processes


@pytest.fixture
def curve_serve(tmp_path):
    pairs = make_keys(str(tmp_path / "keys"), ["server", "gateway", "stranger"])
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "gateway.key").write_text(open(pairs["gateway"][0]).read())
    serve = ServeProcess(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                          "--sim-workers", "1", "--sim-step-s", "0.01", "--sim-load-s", "0.05",
                          "--output-dir", str(tmp_path / "out"), "--input-dir", str(tmp_path),
                          "--curve-secret-key", pairs["server"][1],
                          "--curve-allowed-keys", str(allowed)], ready_timeout_s=120)
    yield serve, pairs
    serve.kill()


@pytest.fixture
def start_gateway():
    procs: list[subprocess.Popen] = []

    def start(*argv: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "gateway",
                                 "--http", f"127.0.0.1:{port}", *argv], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    yield start
    stop_processes(procs)


def _wait_listening(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            requests.get(url + "/openapi.json", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("the gateway never listened")


def test_gateway_with_client_keys_generates_through_a_curve_frontend(curve_serve, start_gateway):
    serve, pairs = curve_serve
    proc, url = start_gateway("--endpoint", serve.endpoint, "--curve-server-key", pairs["server"][0],
                              "--curve-client-key", pairs["gateway"][1])
    _wait_listening(proc, url)
    status = requests.get(url + "/v1/status", timeout=30)
    assert status.status_code == 200, status.text
    assert [w["simulated"] for w in status.json()["workers"]] == [True]
    reply = requests.post(url + "/v1/generate", timeout=60, json={
        "message_type": "generate_sdxl_enhanced", "prompt": "a lighthouse", "model_base": "tiny-sdxl",
        "steps": 3, "width": 256, "height": 256})
    assert reply.status_code == 200, reply.text
    assert reply.json()["success"] is True and reply.json()["data"]["generated_images"]
    a1111 = requests.post(url + "/sdapi/v1/txt2img", timeout=60, json={
        "prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256,
        "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}})
    assert a1111.status_code == 200, a1111.text
    info = json.loads(a1111.json()["info"])
    assert len(info["all_seeds"]) == 1 and info["worker_id"]


def test_gateway_with_a_key_the_broker_does_not_allow_gets_no_answer(curve_serve, start_gateway):
    serve, pairs = curve_serve
    proc, url = start_gateway("--endpoint", serve.endpoint, "--curve-server-key", pairs["server"][0],
                              "--curve-client-key", pairs["stranger"][1])
    _wait_listening(proc, url)
    status = requests.get(url + "/v1/status", timeout=30)
    assert status.status_code >= 500
    assert status.json()["success"] is False
    assert "refused this client's CURVE key" in status.json()["error"]


def test_half_a_curve_configuration_or_a_missing_key_file_is_refused_at_start(curve_serve, start_gateway, tmp_path):
    serve, pairs = curve_serve
    proc, _ = start_gateway("--endpoint", serve.endpoint, "--curve-server-key", pairs["server"][0])
    assert proc.wait(timeout=60) == 2
    assert "CURVE needs both --curve-server-key and --curve-client-key" in proc.stderr.read()
    proc, _ = start_gateway("--endpoint", serve.endpoint, "--curve-server-key", pairs["server"][0],
                            "--curve-client-key", str(tmp_path / "missing.key_secret"))
    assert proc.wait(timeout=60) == 2
    assert "missing.key_secret" in proc.stderr.read()
