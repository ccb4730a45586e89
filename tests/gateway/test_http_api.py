"""The gateway's own HTTP surface over a real serve --http: /v1/generate in the three forms,
Idempotency-Key, errors as HTTP statuses with the contract's body, and the safety rules
(loopback by default, bearer token, body cap, CORS off, images only from the output root).
Simulated workers where only the HTTP side matters (named so); a real worker for files."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import requests
from websockets.exceptions import InvalidStatus, ConnectionClosed
from websockets.sync.client import connect

from tests.serve.conftest import ROOT, cli, free_port, stop_processes

pytestmark = pytest.mark.slow

FLAT = {"message_type": "generate_sdxl_enhanced", "prompt": "a fox", "model_base": "tiny-sdxl",
        "width": 256, "height": 256, "steps": 3}
NESTED = {"message_type": "inference_request",
          "data": {"prompt": "a fox", "models": {"base": "tiny-sdxl"},
                   "dimensions": {"width": 256, "height": 256},
                   "hyperparameters": {"num_inference_steps": 3}}}
LEGACY = {"action": "generate",
          "prompt_submission": {"model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "a fox"},
                                "hyperparameters": {"width": 256, "height": 256, "steps": 3}}}


class GatewayProcess:
    """A second `sdxl-broker gateway` on the same broker (several may run at once)."""

    def __init__(self, endpoint: str, *extra: str, host: str = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "gateway", "--endpoint", endpoint,
             "--http", f"{host}:{self.port}", *extra], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/openapi.json", timeout=2)
                return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("gateway did not start: " + self.proc.stderr.read())

    def stop(self) -> None:
        stop_processes([self.proc])


@pytest.fixture
def gateway_process(sim_rig):
    started = []

    def start(*extra: str) -> GatewayProcess:
        process = GatewayProcess(sim_rig.endpoint, *extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.mark.parametrize("form", [FLAT, NESTED, LEGACY], ids=["flat", "nested", "legacy"])
def test_generate_takes_every_contract_form(sim_rig, form):
    reply = requests.post(sim_rig.url + "/v1/generate", json=form, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] and body["final"] and body["data"]["generated_images"]
    expected = {"generate_sdxl_enhanced": "generate_sdxl_enhanced_response",
                "inference_request": "inference_response"}.get(form.get("message_type"), "generate_response")
    assert body["message_type"] == expected


def test_idempotency_key_makes_a_retry_the_same_job(sim_rig):
    key = "idem-" + uuid.uuid4().hex
    before = requests.get(sim_rig.url + "/v1/status", timeout=10).json()["broker"]["accepted"]
    first = requests.post(sim_rig.url + "/v1/generate", json=FLAT, headers={"Idempotency-Key": key},
                          timeout=60).json()
    second = requests.post(sim_rig.url + "/v1/generate", json=FLAT, headers={"Idempotency-Key": key},
                           timeout=60).json()
    after = requests.get(sim_rig.url + "/v1/status", timeout=10).json()["broker"]["accepted"]
    assert first["request_id"] == second["request_id"] == key
    assert first["data"]["generated_images"][0]["seed"] == second["data"]["generated_images"][0]["seed"]
    assert after - before == 1
    other = requests.post(sim_rig.url + "/v1/generate", json={**FLAT, "prompt": "another"},
                          headers={"Idempotency-Key": key}, timeout=60)
    assert other.status_code == 409 and other.json()["error_code"] == "duplicate_request_id"
    job = requests.get(f"{sim_rig.url}/v1/jobs/{key}", timeout=10).json()
    assert job["reply"]["success"], job  # the first job's record is untouched


def test_errors_are_http_statuses_with_the_contract_body(sim_rig):
    bad = requests.post(sim_rig.url + "/v1/generate", json={**FLAT, "width": 100, "steps": 0}, timeout=30)
    assert bad.status_code == 422
    body = bad.json()
    assert body["error_code"] == "validation_error" and body["success"] is False and body["final"]
    assert {e["field"] for e in body["errors"]} >= {"width", "steps"}

    unknown = requests.post(sim_rig.url + "/v1/generate", json={"message_type": "nope"}, timeout=30)
    assert unknown.status_code == 400 and unknown.json()["error_code"] == "unknown_message_type"
    not_json = requests.post(sim_rig.url + "/v1/generate", data=b"{nope",
                             headers={"content-type": "application/json"}, timeout=30)
    assert not_json.status_code == 400 and not_json.json()["error_code"] == "malformed_message"

    # JSON allows lone surrogates; UTF-8 and msgpack do not: refused, never a 500
    for path, raw in (("/v1/generate", b'{"message_type": "generate_sdxl_enhanced", "request_id": "\\ud800x", '
                                       b'"prompt": "a", "model_base": "tiny-sdxl"}'),
                      ("/sdapi/v1/txt2img", b'{"prompt": "a \\udc00 fox"}')):
        lone = requests.post(sim_rig.url + path, data=raw, headers={"content-type": "application/json"},
                             timeout=30)
        assert lone.status_code == 400 and lone.json()["error_code"] == "malformed_message", lone.text

    a1111 = requests.post(sim_rig.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0}, timeout=30)
    assert a1111.status_code == 422 and a1111.json()["error_code"] == "validation_error"
    wrong_type = requests.post(sim_rig.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"},
                               timeout=30)
    assert wrong_type.status_code == 422 and wrong_type.json()["errors"][0]["field"] == "steps"


def test_a_non_loopback_bind_needs_a_token_or_insecure(sim_rig):
    refused = cli("gateway", "--endpoint", sim_rig.endpoint, "--http", f"0.0.0.0:{free_port()}",
                  timeout_s=60)
    assert refused.returncode == 2 and "--http-token" in refused.stderr
    serve_refused = cli("serve", "--sim-workers", "1", "--frontend", "tcp://127.0.0.1:*",
                        "--backend", "tcp://127.0.0.1:*", "--http", f"0.0.0.0:{free_port()}",
                        timeout_s=60)
    assert serve_refused.returncode == 2 and "--http-token" in serve_refused.stderr


def test_bearer_token_guards_http_and_websocket(gateway_process):
    gw = gateway_process("--http-token", "s3cret")
    assert requests.get(gw.url + "/v1/status", timeout=10).status_code == 401
    assert requests.get(gw.url + "/v1/status", headers={"Authorization": "Bearer wrong"},
                        timeout=10).status_code == 401
    assert requests.get(gw.url + "/v1/status", headers={"Authorization": "Bearer s3cret"},
                        timeout=10).status_code == 200
    assert requests.get(gw.url + "/?token=s3cret", timeout=10).status_code == 200
    ws = gw.url.replace("http", "ws") + "/v1/ws"
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        with connect(ws) as socket:
            socket.send('{"type": "watch"}')
            socket.recv(timeout=10)
    with connect(ws, additional_headers={"Authorization": "Bearer s3cret"}) as socket:
        socket.send('{"type": "watch"}')
        assert socket.recv(timeout=20)


def test_bodies_beyond_the_cap_get_413(gateway_process):
    gw = gateway_process("--http-max-body-mb", "0.001")  # about 1 KB
    big = {**FLAT, "prompt": "x" * 4000}
    sized = requests.post(gw.url + "/v1/generate", json=big, timeout=30)
    assert sized.status_code == 413 and sized.json()["error_code"] == "malformed_message"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"message_type": "generate_sdxl_enhanced", "prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'
    chunked = requests.post(gw.url + "/v1/generate", data=chunks(),
                            headers={"content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    assert requests.post(gw.url + "/v1/generate", json=FLAT, timeout=60).status_code == 200


def test_cors_is_off_unless_configured(sim_rig, gateway_process):
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    off = requests.options(sim_rig.url + "/v1/generate", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in off.headers
    gw = gateway_process("--http-cors-origin", "http://elsewhere.example")
    on = requests.options(gw.url + "/v1/generate", headers=preflight, timeout=10)
    assert on.headers.get("access-control-allow-origin") == "http://elsewhere.example"


def test_images_are_served_from_the_output_root_only(real_rig, tmp_path):
    reply = requests.post(real_rig.url + "/v1/generate", json={**FLAT, "steps": 2}, timeout=240).json()
    path = reply["data"]["generated_images"][0]["path"]
    import os
    relative = os.path.relpath(path, real_rig.output_dir)
    ok = requests.get(f"{real_rig.url}/v1/images/{relative}", timeout=10)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert requests.get(f"{real_rig.url}/v1/jobs/{reply['request_id']}/images/0", timeout=10).status_code == 200
    outside = tmp_path / "secret.png"
    outside.write_bytes(ok.content)  # a real image, outside the root
    for attempt in (f"../{os.path.basename(str(tmp_path))}/secret.png", str(outside),
                    "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd"):
        refused = requests.get(f"{real_rig.url}/v1/images/{attempt}", timeout=10)
        assert refused.status_code == 404, (attempt, refused.status_code)
