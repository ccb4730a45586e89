"""Issue 15: what the request alone decides is decided by the broker before queueing, every
problem with its field path as the client wrote it, in each form; the worker's own findings are
named in the client's form too."""

from __future__ import annotations

import pytest

from protocol import constants as C
from protocol import rules
from protocol.errors import JobError, ProtocolError
from protocol.parse import parse_request


def problems(body: dict) -> dict[str, str]:
    with pytest.raises(ProtocolError) as info:
        parse_request(body)
    assert info.value.code == C.VALIDATION_ERROR
    return {e.field: e.message for e in info.value.errors}


FLAT = {"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl"}


def nested(**data) -> dict:
    return {"message_type": C.GENERATE_NESTED, "data": {"prompt": "p", "model_name": "tiny-sdxl", **data}}


def legacy(**parts) -> dict:
    ps = {"model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p"}}
    for key, value in parts.items():
        ps[key] = {**ps.get(key, {}), **value}
    return {"action": "generate", "prompt_submission": ps}


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_refiner_switch_bounds_exclude_0_and_1_in_every_form(value):
    assert "refiner_switch" in problems({**FLAT, "refiner_switch": value})
    assert "data.hyperparameters.refiner_switch" in problems(
        nested(hyperparameters={"refiner_switch": value}))
    assert "prompt_submission.hyperparameters.refiner_switch" in problems(
        legacy(hyperparameters={"refiner_switch": value}))


def test_upscale_factor_and_method_are_the_workers_own():
    found = problems({**FLAT, "upscale_factor": 6, "upscale_method": "../up.safetensors"})
    assert found == {"upscale_factor": found["upscale_factor"],
                     "upscale_method": rules.MODEL_PATH_ESCAPES}
    found = problems(nested(postprocessing={"upscale": {"enabled": True, "factor": 5.0,
                                                        "method": "x.pth"}}))
    assert set(found) == {"data.postprocessing.upscale.factor", "data.postprocessing.upscale.method"}
    ok = parse_request({**FLAT, "upscale_factor": C.MAX_UPSCALE_FACTOR, "upscale_method": " Lanczos"})
    assert ok.job.postprocess.upscale_method == "lanczos"
    # any other name is an upscaler model file, which only the worker can look for
    assert parse_request({**FLAT, "upscale_method": "4x-UltraSharp"}).job is not None


def test_strength_too_low_for_the_steps_is_decided_by_the_broker_in_every_form():
    message = rules.steps_strength_message(10, 0.05)
    assert problems({**FLAT, "init_image": "a.png", "steps": 10, "strength": 0.05}) == \
        {"strength": message}
    assert problems(nested(init_image="a.png", hyperparameters={
        "num_inference_steps": 10, "strength": 0.05})) == {"data.hyperparameters.strength": message}
    assert problems(legacy(conditioning={"prompt": "p", "init_image": "a.png"},
                           hyperparameters={"steps": 10, "strength": 0.05})) == \
        {"prompt_submission.hyperparameters.strength": message}
    assert "at least 20" in message
    # without an init image strength does nothing, so nothing to refuse
    assert parse_request({**FLAT, "steps": 1, "strength": 0.05}).job is not None


def test_paths_that_leave_their_root_are_refused_every_problem_at_once():
    found = problems({**FLAT, "init_image": "../secret.png", "mask_image": "in/../../m.png",
                      "lora_names": ["a"], "lora_paths": ["../../etc/x.safetensors"],
                      "controlnet_images": ["..\\up.png"], "model_vae": "../vae"})
    assert found == {"init_image": rules.INPUT_PATH_ESCAPES, "mask_image": rules.INPUT_PATH_ESCAPES,
                     "lora_paths[0]": rules.MODEL_PATH_ESCAPES,
                     "controlnet_images[0]": rules.INPUT_PATH_ESCAPES,
                     "model_vae": rules.MODEL_PATH_ESCAPES}
    # a file name with two dots is not a climb
    assert parse_request({**FLAT, "init_image": "a..b.png"}).job.init_image == "a..b.png"


def test_worker_errors_are_named_in_the_form_the_client_sent():
    bodies = {
        "flat": {**FLAT, "controlnet_images": ["a.png", "b.png"], "lora_names": ["x"],
                 "init_image": "i.png"},
        "nested": nested(init_image="i.png", lora={"models": [{"name": "x"}]},
                         controlnet={"enabled": False, "control_image": "z.png"},
                         controlnets=[{"control_image": "a.png"}, {"control_image": "b.png"}]),
        "nested-single": nested(init_image="i.png", lora={"models": [{"name": "x"}]},
                                controlnet={"control_image": "a.png"},
                                controlnets=[{"control_image": "b.png"}]),
        "legacy": legacy(conditioning={"prompt": "p", "init_image": "i.png",
                                       "loras": [{"name": "x"}],
                                       "controlnets": [{"image": "a.png"}, {"image": "b.png"}]}),
    }
    expected = {
        "flat": ["controlnet_images[1]", "lora_names[0]", "init_image", "model_base"],
        "nested": ["data.controlnets[1].control_image", "data.lora.models[0].name",
                   "data.init_image", "data.model_name"],
        "nested-single": ["data.controlnets[0].control_image", "data.lora.models[0].name",
                          "data.init_image", "data.model_name"],
        "legacy": ["prompt_submission.conditioning.controlnets[1].image",
                   "prompt_submission.conditioning.loras[0].name",
                   "prompt_submission.conditioning.init_image", "prompt_submission.model.base"],
    }
    for form, body in bodies.items():
        job = parse_request(body).job
        named = []
        for canonical in ("controlnets[1].image", "loras[0].name", "init_image", "models.base"):
            error = JobError(C.MODEL_NOT_FOUND, "not there", {"field": canonical})
            error.name_fields(job.client_path)
            named.append(error.details["errors"][0]["field"])
        assert named == expected[form], form
