"""Previews over ZeroMQ, end to end: serve with a real cpu worker on the tiny kit, the Python
client asks `preview: true`, progress events carry JPEG previews and eta_s."""

import io

import pytest
from PIL import Image

from tests.serve.conftest import one_cpu_worker_argv

pytestmark = pytest.mark.slow


def test_progress_carries_previews_and_eta(start_serve, demo_models_dir, tmp_path):
    from clients.client import BrokerClient

    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "images", tmp_path),
                     ready_timeout_s=180)
    events = []
    for codec_name in ("msgpack", "json"):  # JSON carries the preview as base64
        with BrokerClient(sp.endpoint, timeout_s=120, codec_name=codec_name) as client:
            result = client.generate(prompt="a fox", model_base="tiny-sdxl", steps=4, width=256,
                                     height=256, preview=True, preview_size=48,
                                     on_progress=events.append)
        assert result.images
    previews = [e["preview"] for e in events if e.get("preview")]
    assert len(previews) >= 2, [sorted(e) for e in events]
    import base64
    for data in previews:
        raw = data if isinstance(data, bytes) else base64.b64decode(data)
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == "JPEG" and max(image.size) == 48
    denoising = [e for e in events if e["stage"] == "denoising"]
    assert all(isinstance(e.get("eta_s"), (int, float)) and e["eta_s"] >= 0 for e in denoising)
    assert sp.stop() == 0


def _preview_steps(client, **fields) -> list[int]:
    events = []
    result = client.generate(prompt="a fox", model_base="tiny-sdxl", width=256, height=256,
                             preview=True, preview_size=32, on_progress=events.append, **fields)
    assert result.images
    return [e["step"] for e in events if e.get("stage") == "denoising" and e.get("preview")]


def test_preview_cadence_from_the_server_default_and_per_request(start_serve, demo_models_dir, tmp_path):
    """serve's --preview-every-steps / --preview-interval-ms are the default; a request's
    preview_every_steps / preview_interval_ms (flat, nested, legacy) win. The first step always
    has a preview. Intervals of 0 ms and 60 s make the counts independent of timing."""
    from clients.client import BrokerClient

    sp = start_serve(one_cpu_worker_argv(demo_models_dir, tmp_path / "images", tmp_path,
                                         "--preview-every-steps", "2", "--preview-interval-ms", "0"),
                     ready_timeout_s=180)
    with BrokerClient(sp.endpoint, timeout_s=120) as client:
        assert _preview_steps(client, steps=5) == [1, 2, 4]                       # server default
        assert _preview_steps(client, steps=7, preview_every_steps=3) == [1, 3, 6]
        assert _preview_steps(client, steps=4, preview_interval_ms=60_000) == [1]  # at most 1/min
        # the nested and legacy forms carry the cadence in their metadata
        for body in (
            {"message_type": "inference_request", "request_id": "cad-nested",
             "data": {"prompt": "a fox", "models": {"base": "tiny-sdxl"},
                      "hyperparameters": {"num_inference_steps": 6},
                      "dimensions": {"width": 256, "height": 256},
                      "metadata": {"preview": True, "preview_size": 32, "preview_every_steps": 5}}},
            {"action": "generate", "session_id": "cad-legacy",
             "prompt_submission": {"model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "a fox"},
                                   "hyperparameters": {"steps": 6, "width": 256, "height": 256},
                                   "metadata": {"preview": True, "preview_size": 32,
                                                "preview_every_steps": 5}}}):
            events = []
            result = client.generate(body, on_progress=events.append)
            assert result.images
            assert [e["step"] for e in events
                    if e.get("stage") == "denoising" and e.get("preview")] == [1, 5], body
    assert sp.stop() == 0
