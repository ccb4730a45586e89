"""The defects issue 15 found, each checked over the wire on a real serve + CPU worker, on what a
client sees: the reply, its images, warnings, features and the PNG infotext."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from protocol import constants as C
from tests.conformance.conftest import image_bytes, pixels
from tests.serve.conftest import cli

pytestmark = pytest.mark.slow

BASE = {"message_type": C.GENERATE_FLAT, "prompt": "a fox in the snow", "model_base": "tiny-sdxl",
        "width": 256, "height": 256, "steps": 4, "seed": 11, "return_images": True}


def ok(reply: dict) -> dict:
    assert reply["success"], (reply.get("error_code"), reply.get("error"), reply.get("errors"))
    return reply


def test_refiner_with_a_batch_of_two(client):
    reply = ok(client.request({**BASE, "model_refiner": "tiny-sdxl-refiner", "batch_size": 2,
                               "refiner_switch": 0.5}))
    images = reply["data"]["generated_images"]
    assert [image["index"] for image in images] == [0, 1]
    assert "refiner" in reply["data"]["features_used"] and "batch" in reply["data"]["features_used"]
    assert not any("refiner ran no step" in w for w in reply["warnings"])
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 1.0  # two seeds, two images


def test_depth_and_canny_from_the_flat_form(client):
    reply = ok(client.request({**BASE, "controlnet_types": ["canny", "depth"],
                               "controlnet_images": ["photo.png", "depth.png"]}))
    info = reply["data"]["processing_metrics"]["model_info"]["controlnets"]
    assert [c["type"] for c in info] == ["canny", "depth"]
    assert "canny_preprocess" in reply["data"]["features_used"]  # a photo sent as canny
    assert not any("depth" in w for w in reply["warnings"])  # a depth map is used as it is


def test_depth_from_the_legacy_form_matches_the_flat_form(client):
    flat = ok(client.request({**BASE, "controlnet_types": ["depth"],
                              "controlnet_images": ["depth.png"], "controlnet_preprocess": [False]}))
    legacy = ok(client.request({
        "action": "generate", "prompt_submission": {
            "model": {"base": "tiny-sdxl"},
            "conditioning": {"prompt": BASE["prompt"], "controlnets": [
                {"type": "depth", "image": "depth.png", "preprocess": False}]},
            "hyperparameters": {"width": 256, "height": 256, "steps": 4, "seed": 11},
            "output": {"return_images": True}}}))
    assert image_bytes(flat["data"]["generated_images"][0]) == \
        image_bytes(legacy["data"]["generated_images"][0])


def test_depth_from_the_cli(serve, conformance_dirs, tmp_path):
    done = cli("generate", "a fox", "--model", "tiny-sdxl", "--steps", "2", "--size", "256x256",
               "--controlnet", "depth:" + str(conformance_dirs / "inputs" / "depth.png"),
               "--controlnet-map", "--out", str(tmp_path), "--json", "--endpoint", serve.endpoint,
               timeout_s=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"success": true' in done.stdout


def test_an_edge_map_sent_as_canny_is_not_edge_detected_again(client):
    as_is = ok(client.request({**BASE, "controlnet_types": ["canny"],
                               "controlnet_images": ["edges.png"], "controlnet_preprocess": [False]}))
    auto = ok(client.request({**BASE, "controlnet_types": ["canny"],
                              "controlnet_images": ["edges.png"]}))
    assert "canny_preprocess" not in auto["data"]["features_used"]
    assert image_bytes(auto["data"]["generated_images"][0]) == \
        image_bytes(as_is["data"]["generated_images"][0])
    # a photo still gets its edges found
    photo = ok(client.request({**BASE, "controlnet_types": ["canny"],
                               "controlnet_images": ["photo.png"]}))
    assert "canny_preprocess" in photo["data"]["features_used"]


def test_reported_seeds_fit_a_long_and_reproduce_when_sent_back(client):
    top = C.MAX_SEED
    batch = ok(client.request({**BASE, "seed": top, "batch_size": 2}))
    images = batch["data"]["generated_images"]
    assert [image["seed"] for image in images] == [top, 0]
    for image in images:  # each reported seed, sent back alone, is accepted and gives that image
        again = ok(client.request({**BASE, "seed": image["seed"]}))
        # a batch runs as one tensor: its float sums may differ from a lone image's by one level
        diff = np.abs(pixels(again["data"]["generated_images"][0]) - pixels(image))
        assert diff.max() <= 2, diff.max()


def test_infotext_states_only_the_karras_that_was_applied(client):
    ignored = ok(client.request({**BASE, "scheduler": "DDIM", "use_karras_sigmas": True}))
    assert any("use_karras_sigmas ignored" in w for w in ignored["warnings"])
    applied = ok(client.request({**BASE, "scheduler": "DPM++ 2M Karras"}))

    def infotext(reply):
        with Image.open(io.BytesIO(image_bytes(reply["data"]["generated_images"][0]))) as image:
            return image.text["parameters"]
    assert "Sampler: DDIM," in infotext(ignored) and "Karras" not in infotext(ignored)
    assert "Sampler: DPM++ 2M Karras," in infotext(applied)


def test_a_legacy_body_with_two_ids_is_answered_under_its_session_id(serve):
    """The legacy form's id is its session_id; the client and the broker decide it with one
    function (protocol.request_ids), so the client waits for the id the broker answers with.
    Before, the client waited for request_id while the broker answered session_id: every
    reply was skipped and the request failed after its retries."""
    from clients.client import BrokerClient

    body = {"action": "generate", "session_id": "legacy-session", "request_id": "legacy-request",
            "prompt_submission": {"model": {"base": "tiny-sdxl"},
                                  "conditioning": {"prompt": "a fox"},
                                  "hyperparameters": {"width": 256, "height": 256, "steps": 2}},
            "stream": True}
    seen = []
    with BrokerClient(serve.endpoint, timeout_s=60, retries=1) as client:
        reply = ok(client.request(body, on_progress=seen.append))
        assert reply["request_id"] == "legacy-session" and reply["message_type"] == "generate_response"
        assert seen and {m["request_id"] for m in seen} == {"legacy-session"}
        # a numeric id (a C# long) is answered as text, and the client takes that reply too
        numeric = {"message_type": C.STATUS, "request_id": 12345}
        assert client.request(numeric)["request_id"] == "12345"
