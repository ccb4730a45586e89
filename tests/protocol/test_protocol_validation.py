"""Each validation rule at its bound and past it, every problem reported with its path,
unknown fields as warnings, and the naming rules (schedulers, ControlNet types, worker type)."""

import pytest

from protocol import constants as C
from protocol.errors import ProtocolError, ValidationFailed
from protocol.normalize import resolve_scheduler
from protocol.parse import parse_request, peek

BASE = {"message_type": "generate_sdxl_enhanced", "request_id": "r", "prompt": "p",
        "model_base": "tiny-sdxl"}


def flat(**fields) -> dict:
    return {**BASE, **fields}


def nested(**data) -> dict:
    return {"message_type": "inference_request", "request_id": "n",
            "data": {"prompt": "p", "models": {"base": "tiny-sdxl"}, **data}}


def legacy(conditioning=None, **submission) -> dict:
    return {"action": "generate", "session_id": "l",
            "prompt_submission": {"model": {"base": "tiny-sdxl"},
                                  "conditioning": {"prompt": "p", **(conditioning or {})},
                                  **submission}}


def fields_of(body, **kw) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as info:
        parse_request(body, **kw)
    assert info.value.code == C.VALIDATION_ERROR
    return {e.field: e.message for e in info.value.errors}


# (flat field, values at the bounds that pass, values past them that fail)
BOUNDS = [
    ("width", [256, 2048, 1024], [248, 2056, 1020, 0]),
    ("height", [256, 2048], [255, 2049, 4096]),
    ("steps", [1, 150], [0, 151]),
    ("guidance_scale", [1.0, 30.0], [0.99, 30.01]),
    ("seed", [-1, 0, C.MAX_SEED], [-2, C.MAX_SEED + 1, 10**40]),
    ("strength", [0.0, 1.0], [-0.01, 1.01]),
    ("batch_size", [1, 9], [0, 10]),
    ("output_quality", [1, 100], [0, 101]),
    ("upscale_factor", [1.0, C.MAX_UPSCALE_FACTOR], [0.5, C.MAX_UPSCALE_FACTOR + 0.1]),
    ("timeout", [0.001, C.MAX_TIMEOUT_S], [0, -1, C.MAX_TIMEOUT_S + 1]),
    ("clip_skip", [0, C.MAX_CLIP_SKIP], [-1, C.MAX_CLIP_SKIP + 1]),
]


@pytest.mark.parametrize("field,good,bad", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_scalar_bounds(field, good, bad):
    for value in good:
        parse_request(flat(**{field: value}))
    for value in bad:
        errors = fields_of(flat(**{field: value}))
        assert list(errors) == [field], (value, errors)


def test_lora_weight_bounds():
    for w in (-2.0, 2.0):
        job = parse_request(flat(lora_names=["a"], lora_weights=[w])).job
        assert job.loras[0].weight == w
    for w in (-2.01, 2.01):
        assert list(fields_of(flat(lora_names=["a"], lora_weights=[w]))) == ["lora_weights[0]"]


def test_controlnet_scale_bounds():
    for w in (0.0, 2.0):
        parse_request(flat(controlnet_images=["c.png"], controlnet_weights=[w]))
    for w in (-0.01, 2.01):
        assert list(fields_of(flat(controlnet_images=["c.png"], controlnet_weights=[w]))) == \
            ["controlnet_weights[0]"]


def test_bounds_in_nested_and_legacy_report_the_client_path():
    errors = fields_of(nested(dimensions={"width": 2056, "height": 512},
                              hyperparameters={"num_inference_steps": 151, "guidance_scale": 0.5},
                              lora={"enabled": True, "models": [{"name": "a", "weight": 3}]},
                              batch={"size": 10}, output={"quality": 0},
                              controlnet={"enabled": True, "control_image": "x.png",
                                          "conditioning_scale": 2.5}))
    assert set(errors) == {"data.dimensions.width", "data.hyperparameters.num_inference_steps",
                           "data.hyperparameters.guidance_scale", "data.lora.models[0].weight",
                           "data.batch.size", "data.output.quality",
                           "data.controlnet.conditioning_scale"}
    errors = fields_of(legacy(hyperparameters={"steps": 0, "width": 100}))
    assert set(errors) == {"prompt_submission.hyperparameters.steps",
                           "prompt_submission.hyperparameters.width"}


def test_prompt_and_base_model_are_required_in_every_form():
    assert fields_of({"message_type": "generate_sdxl_enhanced"}) == {
        "prompt": "is required", "model_base": "a base model is required"}
    assert set(fields_of({"message_type": "inference_request", "data": {"prompt": "  "}})) == \
        {"data.prompt", "data.models.base"}
    assert set(fields_of({"message_type": "inference_request"})) == {"data"}
    assert set(fields_of({"action": "generate", "prompt_submission": {"conditioning": {}}})) == \
        {"prompt_submission.conditioning.prompt", "prompt_submission.model.base"}
    # a default base model fills the gap, and data.model_name counts as a base
    assert parse_request({**BASE, "model_base": None}, default_model_base="d").job.models.base == "d"
    assert parse_request({"message_type": "inference_request",
                          "data": {"prompt": "p", "model_name": "m"}}).job.models.base == "m"


def test_five_problems_are_all_reported():
    body = flat(prompt="", width=1000 + 4, steps=500, lora_names=["a", "b"], lora_weights=[1.0],
                scheduler="Warp Drive")
    errors = fields_of(body)
    assert set(errors) == {"prompt", "width", "steps", "lora_names,lora_weights", "scheduler"}
    assert "multiple of 8" in errors["width"]
    assert "Warp Drive" in errors["scheduler"] and "Euler a" in errors["scheduler"]


def test_parallel_arrays_of_different_lengths_name_the_arrays():
    errors = fields_of(flat(controlnet_types=["canny", "depth"], controlnet_images=["a.png"]))
    assert errors == {"controlnet_types,controlnet_images":
                      "parallel arrays differ in length: controlnet_types (2), controlnet_images (1)"}
    errors = fields_of(flat(textual_inversion_names=["a"], textual_inversion_tokens=["<a>", "<b>"]))
    assert list(errors) == ["textual_inversion_names,textual_inversion_tokens"]
    errors = fields_of(flat(lora_paths=["a.safetensors"], lora_weights=[0.5, 0.5]))
    assert list(errors) == ["lora_paths,lora_weights"]


def test_other_cross_field_rules():
    assert list(fields_of(flat(controlnet_types=["canny"]))) == ["controlnet_images"]
    assert list(fields_of(flat(lora_weights=[0.5]))) == ["lora_weights"]
    assert list(fields_of(flat(mask_image="m.png"))) == ["mask_image"]
    assert list(fields_of(nested(controlnet={"enabled": True}))) == ["data.controlnet.control_image"]
    assert list(fields_of(nested(output={"upscale": {"enabled": True}}))) == \
        ["data.output.upscale.factor"]
    assert list(fields_of(legacy({"loras": [{"weight": 0.5}]}))) == ["prompt_submission.conditioning.loras[0]"]


def test_unknown_fields_warn_and_name_the_field():
    assert parse_request(flat(foo=1)).warnings == ["unknown field 'foo' ignored"]
    parsed = parse_request(nested(extra_thing=1, dimensions={"width": 512, "depth": 3}))
    assert parsed.warnings == ["unknown fields ignored: data.extra_thing, data.dimensions.depth"] or \
        parsed.warnings == ["unknown fields ignored: data.dimensions.depth, data.extra_thing"]
    assert parsed.job.width == 512


def test_disabled_sections_are_ignored_with_a_warning():
    parsed = parse_request(nested(lora={"enabled": False, "models": [{"name": "a"}]}))
    assert parsed.job.loras == ()
    assert any("data.lora.models ignored" in w for w in parsed.warnings)


@pytest.mark.parametrize("value,field", [("../x", "save_path"), ("/abs/dir", "save_path"),
                                         ("C:\\out", "save_path"), ("a/../../b", "save_path")])
def test_save_path_must_stay_inside_the_output_root(value, field):
    errors = fields_of(flat(save_path=value))
    assert list(errors) == [field]
    parse_request(flat(save_path="outputs/castles/"))


def test_pickle_checkpoints_are_refused_unless_allowed():
    body = flat(model_base="/models/x.ckpt", lora_paths=["a.safetensors", "b.PT"],
                model_vae="vae.bin", textual_inversion_paths=["t.pth"])
    errors = fields_of(body)
    assert set(errors) == {"model_base", "lora_paths[1]", "model_vae", "textual_inversion_paths[0]"}
    assert all("pickle checkpoints are refused" in m for m in errors.values())
    assert parse_request(body, allow_pickle=True).job.models.base == "/models/x.ckpt"
    assert "data.model_name" in fields_of({"message_type": "load_model",
                                           "data": {"model_name": "m.ckpt"}})


def test_image_fields_accept_paths_base64_and_bytes_but_not_empty_or_numbers():
    job = parse_request(flat(init_image=b"\x89PNG...", mask_image="data:image/png;base64,AAAA",
                             controlnet_images=["inputs/c.png"])).job
    assert job.init_image == b"\x89PNG..." and job.mode == "inpaint"
    errors = fields_of(flat(init_image="", controlnet_images=[12]))
    assert set(errors) == {"init_image", "controlnet_images[0]"}


def test_wrong_types_are_field_errors():
    errors = fields_of(flat(width="wide", prompt=5, lora_names="a", tags=[1], stream="maybe"))
    assert set(errors) == {"width", "prompt", "lora_names", "tags[0]", "stream"}


def test_nan_and_infinity_are_rejected():
    errors = fields_of(flat(guidance_scale=float("nan"), strength=float("inf")))
    assert set(errors) == {"guidance_scale", "strength"}


def test_huge_strings_are_bounded():
    errors = fields_of(flat(prompt="x" * (1 << 20)))
    assert list(errors) == ["prompt"]


@pytest.mark.parametrize("name,cls,karras", [
    ("DPMSolverMultistep", "DPMSolverMultistepScheduler", None),
    ("EulerAncestral", "EulerAncestralDiscreteScheduler", None),
    ("UniPCMultistep", "UniPCMultistepScheduler", None),
    ("KDPM2Ancestral", "KDPM2AncestralDiscreteScheduler", None),
    ("HeunDiscreteScheduler", "HeunDiscreteScheduler", None),
    ("dpm++ 2m karras", "DPMSolverMultistepScheduler", True),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", None),
    ("Euler a", "EulerAncestralDiscreteScheduler", None),
    ("euler", "EulerDiscreteScheduler", None),
    ("DDIM", "DDIMScheduler", None), ("Heun", "HeunDiscreteScheduler", None),
    ("LMS", "LMSDiscreteScheduler", None), ("UniPC", "UniPCMultistepScheduler", None),
    ("DPM2", "KDPM2DiscreteScheduler", None), ("DPM2 a", "KDPM2AncestralDiscreteScheduler", None),
    ("DPM++ SDE", "DPMSolverSinglestepScheduler", None),
])
def test_scheduler_names(name, cls, karras):
    assert resolve_scheduler(name) == (cls, karras)
    job = parse_request(flat(scheduler=name)).job
    assert job.scheduler == cls and job.use_karras_sigmas is bool(karras)


def test_every_diffusers_class_is_reachable_and_karras_can_be_overridden():
    for cls in C.SCHEDULERS:
        assert resolve_scheduler(cls.upper())[0] == cls
    job = parse_request(flat(scheduler="DPM++ 2M Karras", use_karras_sigmas=False)).job
    assert job.use_karras_sigmas is False


@pytest.mark.parametrize("types,models,expected", [
    (None, ["diffusers/controlnet-depth-sdxl-1.0.safetensors"], "depth"),
    (None, ["C:\\models\\OpenPose_XL.safetensors"], "pose"),
    (None, ["models/lineart_v2"], "lineart"),
    (None, ["something_else"], "canny"),
    (["Scribble"], None, "scribble"),
    (["openpose"], None, "pose"),
])
def test_controlnet_type_inference(types, models, expected):
    body = flat(controlnet_images=["c.png"])
    if types:
        body["controlnet_types"] = types
    if models:
        body["controlnet_models"] = models
    assert parse_request(body).job.controlnets[0].type == expected


def test_unknown_controlnet_type_is_an_error():
    assert list(fields_of(flat(controlnet_types=["tile"], controlnet_images=["c.png"]))) == \
        ["controlnet_types[0]"]


def test_lora_name_is_the_path_stem():
    job = parse_request(flat(lora_paths=["/loras/My Style.v2.safetensors", "C:\\l\\detail.safetensors"])).job
    assert [x.name for x in job.loras] == ["My Style.v2", "detail"]
    assert [x.weight for x in job.loras] == [1.0, 1.0]


@pytest.mark.parametrize("extra,expected", [
    ({}, C.WORKER_BASIC),
    ({"lora_names": ["a"]}, C.WORKER_ENHANCED),
    ({"controlnet_images": ["c.png"]}, C.WORKER_ENHANCED),
    ({"model_refiner": "r"}, C.WORKER_ENHANCED),
    ({"model_vae": "v"}, C.WORKER_ENHANCED),
    ({"auto_contrast": True}, C.WORKER_ENHANCED),
    ({"upscale_factor": 2}, C.WORKER_ENHANCED),
    ({"upscale_factor": 1}, C.WORKER_BASIC),
    ({"batch_size": 2}, C.WORKER_ENHANCED),
    ({"textual_inversion_names": ["t"]}, C.WORKER_ENHANCED),
    ({"init_image": "i.png"}, C.WORKER_ENHANCED),
    ({"width": 1024, "height": 1024}, C.WORKER_BASIC),
    ({"width": 1024, "height": 1032}, C.WORKER_ENHANCED),
])
def test_worker_type_resolution(extra, expected):
    assert parse_request(flat(**extra)).job.worker_type == expected


def test_explicit_nested_worker_type_is_kept_and_checked():
    assert parse_request(nested(worker_type="enhanced_sdxl_worker")).job.worker_type == C.WORKER_ENHANCED
    assert list(fields_of(nested(worker_type="gpu_worker_9000"))) == ["data.worker_type"]


def test_unknown_and_missing_message_types():
    for body in ({"message_type": "fly"}, {"prompt": "p"}, {"message_type": 5}, {"action": ["x"]}):
        with pytest.raises(ProtocolError) as info:
            parse_request(body)
        assert info.value.code == C.UNKNOWN_MESSAGE_TYPE
    with pytest.raises(ProtocolError) as info:
        parse_request([1, 2])
    assert info.value.code == C.MALFORMED_MESSAGE


def test_management_validation():
    assert list(fields_of({"message_type": "model_load_request", "data": {}})) == ["data.model_name"]
    assert list(fields_of({"message_type": "cancel_request"})) == ["request_id"]
    assert list(fields_of({"message_type": "cleanup", "data": {"workers": "w1"}})) == ["data.workers"]


def test_peek_never_raises_and_addresses_replies():
    assert peek({"message_type": "inference_request", "data": {"metadata": {"request_id": "m"}}}) == \
        ("inference_response", "m")
    assert peek({"action": "generate", "session_id": "s"}) == ("generate_response", "s")
    assert peek({"message_type": "nope", "request_id": "q"}) == ("error_response", "q")
    assert peek({"message_type": {"a": 1}, "request_id": {"b": 2}}) == ("error_response", None)
    assert peek(None) == ("error_response", None)
    assert peek({"request_id": 12}) == ("error_response", "12")


def test_request_id_is_generated_when_missing():
    # parse decides the id once: the job carries it and the broker answers with it
    parsed = parse_request({k: v for k, v in BASE.items() if k != "request_id"})
    assert len(parsed.request_id) == 32 and parsed.job.request_id == parsed.request_id
    assert parse_request({**BASE, "request_id": None, "session_id": "sess"}).job.request_id == "sess"
    for body in (nested(), {**nested(), "request_id": None, "session_id": "s"}, legacy(),
                 {**legacy(), "session_id": None, "request_id": "q"}, flat(session_id="s2")):
        parsed = parse_request(body)
        assert parsed.request_id == parsed.job.request_id
    assert parse_request(flat(session_id="s2", request_id=None)).request_id == "s2"
    assert parse_request({**legacy(), "session_id": None, "request_id": "q"}).request_id == "q"


def test_stream_flag_in_every_form():
    assert parse_request(flat(stream=True)).job.stream is True
    assert parse_request({**nested(), "stream": True}).job.stream is True
    assert parse_request(nested(metadata={"stream": True})).job.stream is True
    assert parse_request({**legacy(), "stream": True}).job.stream is True


def test_numbers_and_booleans_are_strict():
    # the schemas say integer / number / boolean; true is not 1 and "512" is not 512
    errors = fields_of(flat(steps=True, guidance_scale=False, width="512", height=512.0, stream=1))
    assert set(errors) == {"steps", "guidance_scale", "width", "height", "stream"}
    assert parse_request(flat(guidance_scale=7, strength=1)).job.guidance_scale == 7.0  # int ok


def test_list_length_bounds():
    n = C.MAX_LIST_ITEMS
    assert len(parse_request(flat(lora_names=[f"l{i}" for i in range(n)])).job.loras) == n
    assert list(fields_of(flat(lora_names=[f"l{i}" for i in range(n + 1)]))) == ["lora_names"]
    parse_request(flat(tags=["t"] * C.MAX_TAGS))
    assert list(fields_of(flat(tags=["t"] * (C.MAX_TAGS + 1)))) == ["tags"]


def test_null_items_in_parallel_arrays():
    job = parse_request(flat(lora_names=[None, "b"], lora_paths=["x/a.safetensors", None])).job
    assert [(x.name, x.path) for x in job.loras] == [("a", "x/a.safetensors"), ("b", None)]
    assert fields_of(flat(lora_names=[None], lora_paths=[None])) == {
        "lora_names[0]": "each LoRA needs a name or a path"}
    assert list(fields_of(flat(textual_inversion_names=[None]))) == ["textual_inversion_names[0]"]
