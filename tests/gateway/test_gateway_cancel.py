"""The gateway cancels its jobs on the exchange that submitted them, so it needs no trust: here
a standalone `sdxl-broker gateway` connects to a broker's main frontend without CURVE over
loopback (where the broker lets only a job's submitting connection cancel it), with a real
`serve` and SIMULATED workers (named as such: the rule is the broker's). The WebSocket's
`cancel` and A1111's `/sdapi/v1/interrupt` cancel the gateway's own jobs; a ZeroMQ client's job
is not the gateway's to cancel (`forbidden`), and it finishes for its owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from websockets.sync.client import connect

from clients.client import BrokerClient
from tests.serve.conftest import ROOT, ServeProcess, free_port, stop_processes

pytestmark = pytest.mark.slow
LONG_STEPS = 60   # 3 s on the simulated worker: long enough to be cancelled while running


@pytest.fixture
def gateway(tmp_path):
    sp = ServeProcess(["--frontend", "tcp://127.0.0.1:*", "--backend", f"ipc://{tmp_path}/be.sock",
                      "--sim-workers", "2", "--sim-step-s", "0.05", "--sim-load-s", "0.01",
                      "--default-model-base", "tiny-sdxl"])
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "gateway", "--endpoint", sp.endpoint,
                             "--http", f"127.0.0.1:{port}", "--http-default-model", "tiny-sdxl"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/v1/status", timeout=5).ok:
                break
        except requests.RequestException:
            time.sleep(0.2)
    else:
        stop_processes([proc], timeout_s=10)
        sp.kill()
        raise AssertionError("the gateway did not answer /v1/status")
    yield sp, url
    stop_processes([proc], timeout_s=10)
    sp.kill()


def _body(request_id: str) -> dict:
    return {"message_type": "generate_sdxl_enhanced", "request_id": request_id, "prompt": "slow",
            "model_base": "tiny-sdxl", "steps": LONG_STEPS, "width": 256, "height": 256, "stream": True}


def _until(ws, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        message = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
        if predicate(message):
            return message


def test_websocket_cancel_stops_the_gateways_job_and_not_another_clients(gateway):
    sp, url = gateway
    with connect(url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "generate", "request": _body("ws-1")}))
        _until(ws, lambda m: m.get("type") == "progress" and m["event"].get("stage") == "denoising")
        ws.send(json.dumps({"type": "cancel", "request_id": "ws-1"}))
        seen = [_until(ws, lambda m: m.get("type") in ("cancel", "result")) for _ in range(2)]
        by_type = {m["type"]: m for m in seen}
        assert by_type["cancel"]["reply"]["success"] is True, by_type
        assert by_type["cancel"]["reply"]["data"]["state"] == "running"
        assert by_type["result"]["reply"]["error_code"] == "cancelled"

        # a ZeroMQ client's job: the gateway is another connection, so the broker refuses
        with BrokerClient(sp.endpoint, timeout_s=30.0) as client, \
                client.generation(_body("zmq-1")) as job:
            for message in job:
                if message.get("stage") == "denoising":
                    break
            ws.send(json.dumps({"type": "cancel", "request_id": "zmq-1"}))
            refused = _until(ws, lambda m: m.get("type") == "cancel")["reply"]
            assert refused["success"] is False and refused["error_code"] == "forbidden", refused
            assert list(job)[-1]["success"] is True   # finished for its owner


def test_a1111_interrupt_cancels_the_running_txt2img(gateway):
    _, url = gateway
    outcome: dict = {}
    caller = threading.Thread(target=lambda: outcome.update(reply=requests.post(
        url + "/sdapi/v1/txt2img", json={"prompt": "slow", "steps": LONG_STEPS, "width": 256,
                                         "height": 256}, timeout=120)))
    caller.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = requests.get(url + "/sdapi/v1/progress", timeout=10).json()
        if progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the txt2img job did not start: {progress}")
    cancelled = requests.post(url + "/sdapi/v1/interrupt", timeout=30).json()["cancelled"]
    caller.join(60)
    assert len(cancelled) == 1, cancelled
    assert outcome["reply"].status_code == 409                 # `cancelled`
    assert outcome["reply"].json()["error_code"] == "cancelled"
