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
