"""WS /v1/ws against a real serve --http (cpu worker, tiny kit): progress with previews and
exactly one final result; a disconnect mid-job does not cancel it, and a reconnect with the
same id gets the result."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid

import pytest
import requests
from PIL import Image
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ws_url(rig) -> str:
    return rig.url.replace("http://", "ws://") + "/v1/ws"


def body(request_id: str, steps: int = 6) -> dict:
    return {"message_type": "generate_sdxl_enhanced", "request_id": request_id, "prompt": "a fox",
            "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": steps, "seed": 9,
            "preview": True, "preview_size": 64, "return_images": True}


def receive(ws, timeout_s: float = 180.0) -> dict:
    return json.loads(ws.recv(timeout=timeout_s))


def test_progress_with_previews_and_exactly_one_result(real_rig):
    rid = "ws-" + uuid.uuid4().hex[:8]
    with connect(ws_url(real_rig)) as ws:
        ws.send(json.dumps({"type": "generate", "request": body(rid)}))
        messages = []
        while True:
            message = receive(ws)
            messages.append(message)
            if message["type"] == "result":
                break
        # nothing more for this job after its result
        with pytest.raises(TimeoutError):
            ws.recv(timeout=2)
    assert messages[0] == {"type": "accepted", "request_id": rid}
    results = [m for m in messages if m["type"] == "result"]
    assert len(results) == 1 and results[0]["reply"]["success"], results
    progress = [m["event"] for m in messages if m["type"] == "progress"]
    previews = [e["preview"] for e in progress if e.get("preview")]
    assert previews, [e["stage"] for e in progress]
    with Image.open(io.BytesIO(base64.b64decode(previews[-1]))) as image:
        assert image.format == "JPEG" and max(image.size) == 64
    assert any(e.get("eta_s") is not None for e in progress)
    image = results[0]["reply"]["data"]["generated_images"][0]
    with Image.open(io.BytesIO(base64.b64decode(image["image"]))) as final:
        assert final.size == (256, 256)


def test_disconnect_mid_job_does_not_cancel_and_a_reconnect_gets_the_result(real_rig):
    rid = "ws-" + uuid.uuid4().hex[:8]
    with connect(ws_url(real_rig)) as ws:
        ws.send(json.dumps({"type": "generate", "request": body(rid, steps=20)}))
        while True:  # leave once it is denoising
            message = receive(ws)
            if message["type"] == "progress" and message["event"]["stage"] == "denoising":
                break
    # the socket is closed; the job goes on
    time.sleep(1.0)
    job = requests.get(f"{real_rig.url}/v1/jobs/{rid}", timeout=10).json()["job"]
    assert not job.get("error_code"), job
    with connect(ws_url(real_rig)) as ws:
        ws.send(json.dumps({"type": "attach", "request_id": rid}))
        results = []
        deadline = time.monotonic() + 240
        while not results and time.monotonic() < deadline:
            message = receive(ws)
            if message["type"] == "result":
                results.append(message)
    assert len(results) == 1
    reply = results[0]["reply"]
    assert reply["success"], reply
    assert reply["request_id"] == rid

    # and once done, sending the same generate again gets the same result, not a new job
    with connect(ws_url(real_rig)) as ws:
        ws.send(json.dumps({"type": "generate", "request": body(rid, steps=20)}))
        again = [m for m in (receive(ws), receive(ws)) if m["type"] == "result"]
    assert again and again[0]["reply"]["data"]["generated_images"][0]["sha256"] == \
        reply["data"]["generated_images"][0]["sha256"]
