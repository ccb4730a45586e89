"""Errors as a client sees them (issue 15): what the request alone decides comes back from the
broker at once with every problem and its path; what only the worker can know (a file missing
under its roots) comes back with errors[{field, message}] naming the client's own field."""

from __future__ import annotations

import pytest

from protocol import constants as C
from protocol import rule_texts, rules

pytestmark = pytest.mark.slow


def test_request_only_problems_are_all_listed_before_queueing(client):
    """Field bounds, paths and the cross-field rules (steps x strength among them) in one
    errors[] reply: the client fixes everything at once."""
    reply = client.request({"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl",
                            "init_image": "../outside.png", "steps": 10, "strength": 0.05,
                            "model_refiner": "tiny-sdxl-refiner", "refiner_switch": 1.0,
                            "upscale_factor": 6, "upscale_method": "../up.safetensors",
                            "lora_names": ["x"], "lora_paths": ["../../x.safetensors"]})
    assert reply["error_code"] == C.VALIDATION_ERROR
    fields = {e["field"]: e["message"] for e in reply["errors"]}
    assert fields == {"init_image": rules.INPUT_PATH_ESCAPES, "refiner_switch": fields["refiner_switch"],
                      "upscale_factor": fields["upscale_factor"],
                      "upscale_method": rules.MODEL_PATH_ESCAPES,
                      "lora_paths[0]": rules.MODEL_PATH_ESCAPES,
                      "strength": rules.steps_strength_message(10, 0.05)}
    # the same in the legacy form, with the legacy form's paths
    reply = client.request({"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p", "init_image": "photo.png"},
        "hyperparameters": {"width": 250, "steps": 2, "strength": 0.3}}})
    assert [e["field"] for e in reply["errors"]] == ["prompt_submission.hyperparameters.width",
                                                   "prompt_submission.hyperparameters.strength"]


SMALL = {"width": 256, "height": 256, "steps": 2}


@pytest.mark.parametrize("form, body, field", [
    ("flat", {"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl",
              "init_image": "missing.png", **SMALL}, "init_image"),
    ("nested", {"message_type": C.GENERATE_NESTED, "data": {
        "prompt": "p", "model_name": "tiny-sdxl", "init_image": "missing.png",
        "dimensions": {"width": 256, "height": 256},
        "hyperparameters": {"num_inference_steps": 2}}}, "data.init_image"),
    ("legacy", {"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p", "init_image": "missing.png"},
        "hyperparameters": SMALL}}, "prompt_submission.conditioning.init_image"),
])
def test_a_missing_input_file_is_named_in_the_clients_form(client, form, body, field):
    reply = client.request(body)
    assert reply["error_code"] == C.VALIDATION_ERROR, reply
    assert [e["field"] for e in reply["errors"]] == [field]
    assert "missing.png" in reply["errors"][0]["message"]
    assert rule_texts.matching(reply["errors"][0]["message"]) is rule_texts.INPUT_MISSING


@pytest.mark.parametrize("body, field", [
    ({"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl",
      "lora_names": ["tiny-lora-a", "no-such-lora"], **SMALL}, "lora_names[1]"),
    ({"message_type": C.GENERATE_NESTED, "data": {
        "prompt": "p", "models": {"base": "tiny-sdxl", "refiner": "no-such-refiner"},
        "dimensions": {"width": 256, "height": 256}, "hyperparameters": {"num_inference_steps": 2}}},
     "data.models.refiner"),
    ({"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "hyperparameters": SMALL,
        "conditioning": {"prompt": "p", "controlnets": [
            {"type": "canny", "image": "edges.png"},
            {"image": "edges.png", "model": "controlnet/no-such"}]}}},
     "prompt_submission.conditioning.controlnets[1].model"),
])
def test_a_missing_model_is_named_in_the_clients_form(client, body, field):
    reply = client.request(body)
    assert reply["error_code"] == C.MODEL_NOT_FOUND, reply
    assert [e["field"] for e in reply["errors"]] == [field]


UPSCALE_2X = {"width": 256, "height": 256, "steps": 2}


@pytest.mark.parametrize("body, field", [
    ({"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl",
      "upscale_factor": 2.0, "upscale_method": "bicubic", **UPSCALE_2X}, "upscale_method"),
    ({"message_type": C.GENERATE_NESTED, "data": {
        "prompt": "p", "model_name": "tiny-sdxl", "dimensions": {"width": 256, "height": 256},
        "hyperparameters": {"num_inference_steps": 2},
        "output": {"upscale": {"enabled": True, "factor": 2.0, "method": "bicubic"}}}},
     "data.output.upscale.method"),
    ({"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p"}, "hyperparameters": UPSCALE_2X,
        "postprocessing": {"upscale_factor": 2.0, "upscale_method": "bicubic"}}},
     "prompt_submission.postprocessing.upscale_method"),
])
def test_an_upscaler_the_pool_lacks_is_refused_before_queueing(client, body, field):
    """The worker reports its upscalers (the kit's tiny-esrgan, so also the realesrgan alias):
    the broker answers an unknown name at once, naming the client's field, and no job runs."""
    progress = []
    reply = client.request({**body, "stream": True}, on_progress=progress.append)
    assert reply["error_code"] == C.UNSUPPORTED_FEATURE, reply
    assert reply["errors"] == [{"field": field, "message": "unknown upscaler 'bicubic'; this pool has: "
                                                           "lanczos, realesrgan, tiny-esrgan"}]
    assert [p["stage"] for p in progress] in ([], ["queued"])  # never loading, never denoising


@pytest.mark.parametrize("form, body, field", [
    ("flat", {"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl",
              "init_image": "/etc/hostname", **SMALL}, "init_image"),
    ("nested", {"message_type": C.GENERATE_NESTED, "data": {
        "prompt": "p", "model_name": "tiny-sdxl", "init_image": "/etc/hostname",
        "dimensions": {"width": 256, "height": 256},
        "hyperparameters": {"num_inference_steps": 2}}}, "data.init_image"),
    ("legacy", {"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p", "init_image": "/etc/hostname"},
        "hyperparameters": SMALL}}, "prompt_submission.conditioning.init_image"),
])
def test_an_absolute_path_outside_the_input_root_is_named_in_the_clients_form(client, form, body, field):
    """Decided by the worker (its input root, symlinks resolved on its own disk), answered with
    errors[] naming the field the client sent."""
    reply = client.request(body)
    assert reply["error_code"] == C.VALIDATION_ERROR, reply
    assert [e["field"] for e in reply["errors"]] == [field]
    assert rule_texts.matching(reply["errors"][0]["message"]) is rule_texts.INPUT_OUTSIDE_ROOT
