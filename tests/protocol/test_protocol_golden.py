"""Golden vectors: every request example of both seeds translated exactly as the seed shows."""

import json
from pathlib import Path

import pytest

from protocol import constants as C
from protocol.parse import parse_request
from protocol.translate import job_to_flat, job_to_legacy, job_to_nested

VECTORS = Path(__file__).with_name("vectors")


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def same_json(a: dict, b: dict) -> bool:
    """Byte-for-byte JSON equality once key order is ignored (1.0 stays distinct from 1)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("n", [1, 2])
def test_seed1_examples_become_the_seed_legacy_bodies(n):
    # Example 2's input has no model_base, yet its output shows /models/base.safetensors:
    # the seed's orchestrator had a configured default, which is our default_model_base.
    parsed = parse_request(load(f"seed1_example{n}_request.json"),
                           default_model_base="/models/base.safetensors")
    assert parsed.message_type == C.GENERATE_FLAT
    assert parsed.reply_type == "generate_sdxl_enhanced_response"
    assert parsed.warnings == []
    assert same_json(job_to_legacy(parsed.job), load(f"seed1_example{n}_legacy.json"))


def test_seed1_example2_needs_a_base_model_without_a_default():
    from protocol.errors import ValidationFailed
    with pytest.raises(ValidationFailed) as info:
        parse_request(load("seed1_example2_request.json"))
    assert [(e.field, e.message) for e in info.value.errors] == [("model_base", "a base model is required")]


def test_seed1_example2_job_fields():
    job = parse_request(load("seed1_example2_request.json"),
                        default_model_base="/models/base.safetensors").job
    assert job.request_id == "xyz789"
    assert job.loras[0].name == "style_lora" and job.loras[0].weight == 0.8
    assert job.controlnets[0].type == "canny" and job.controlnets[0].weight == 1.0
    assert job.models.refiner == "/models/refiner.safetensors"
    assert job.worker_type == C.WORKER_ENHANCED  # LoRA + ControlNet + refiner


def test_seed1_legacy_outputs_are_themselves_valid_legacy_requests():
    for n in (1, 2):
        legacy = load(f"seed1_example{n}_legacy.json")
        parsed = parse_request(legacy)
        assert parsed.message_type == "generate" and parsed.reply_type == "generate_response"
        assert parsed.request_id == legacy["session_id"]
        assert same_json(job_to_legacy(parsed.job), legacy)


@pytest.mark.parametrize("name", ["phase6_csharp_nested_request.json",
                                  "phase6_csharp_minimal_request.json"])
def test_phase6_csharp_bodies_translate_back_to_themselves(name):
    body = load(name)
    parsed = parse_request(body)
    assert parsed.reply_type == "inference_response"
    assert parsed.warnings == []
    # dict equality: the C# serializer writes 6.0 as 6, which Python compares equal
    assert job_to_nested(parsed.job) == body


def test_phase6_full_request_fields():
    job = parse_request(load("phase6_csharp_nested_request.json")).job
    assert (job.width, job.height, job.steps, job.guidance_scale, job.seed) == (832, 1216, 30, 6.0, 42)
    assert job.scheduler == "EulerAncestralDiscreteScheduler"
    assert [(x.name, x.weight, x.path) for x in job.loras] == [("detail_tweaker", 0.7, None),
                                                               ("anime_style", 1.2, None)]
    cn = job.controlnets[0]
    assert (cn.type, cn.weight, cn.image, cn.preprocess, cn.preprocess_resolution) == \
        ("depth", 0.9, "inputs/depth.png", True, 512)
    assert (job.postprocess.upscale_factor, job.postprocess.upscale_method) == (2.0, "realesrgan")
    assert (job.output.quality, job.output.save_path, job.batch_size) == (90, "outputs/castles/", 2)
    assert job.timeout_s == 300.0 and job.priority == "normal"
    assert job.worker_type == C.WORKER_ENHANCED and "refiner_enhanced" in job.tags


def test_phase6_normalize_request_format_moves_legacy_flat_fields():
    # the seed's _normalize_request_format: model_name -> models.base, flat hyperparameters and
    # dimensions into their sections; a flat value overwrites the nested one (it pops into it)
    body = {"message_type": "inference_request", "request_id": "r1",
            "data": {"prompt": "x", "model_name": "tiny-sdxl", "num_inference_steps": 20,
                     "guidance_scale": 5.0, "seed": 7, "strength": 0.5, "width": 512,
                     "height": 768, "hyperparameters": {"seed": 1, "num_inference_steps": 9}}}
    job = parse_request(body).job
    assert job.models.base == "tiny-sdxl"
    assert (job.steps, job.guidance_scale, job.seed, job.strength) == (20, 5.0, 7, 0.5)
    assert (job.width, job.height) == (512, 768)
    nested = job_to_nested(job)["data"]
    assert nested["models"]["base"] == nested["model_name"] == "tiny-sdxl"
    assert nested["hyperparameters"] == {"num_inference_steps": 20, "guidance_scale": 5.0,
                                         "seed": 7, "strength": 0.5}
    assert nested["dimensions"] == {"width": 512, "height": 768}
    assert nested["metadata"]["priority"] == "normal" and nested["metadata"]["timeout"] == 300


def test_nested_defaults_are_the_phase6_transformer_defaults():
    body = {"message_type": "inference_request", "request_id": "r2",
            "data": {"prompt": "a cat", "models": {"base": "tiny-sdxl"}}}
    data = job_to_nested(parse_request(body).job)["data"]
    assert data["hyperparameters"] == {"num_inference_steps": 25, "guidance_scale": 7.5,
                                       "seed": -1, "strength": 0.8}
    assert data["output"] == {"format": "png", "quality": 95, "save_path": "outputs/",
                              "upscale": {"enabled": False}}
    # dtype "auto" (issue 18): the seed's float16 on accelerators, float32 on CPU, decided by
    # the worker, so a request that never asked for float16 is not warned about it on CPU
    # attention/VAE slicing unset (issue 17): the worker applies what is fastest on its device
    assert data["precision"] == {"dtype": "auto", "vae_dtype": "float32", "cpu_offload": False}
    assert data["metadata"] == {"request_id": "r2", "priority": "normal", "timeout": 300, "tags": []}
    assert data["lora"] == {"enabled": False, "models": []}
    assert data["controlnet"] == {"enabled": False}
    assert data["batch"] == {"size": 1, "parallel": False}
    assert data["worker_type"] == "sdxl_worker"


def test_flat_view_of_seed_example_keeps_what_was_sent():
    body = load("seed1_example1_request.json")
    flat = job_to_flat(parse_request(body).job)
    assert flat == {**{k: v for k, v in body.items() if k != "session_id"}, "request_id": "abc123"}


@pytest.mark.parametrize("body,reply_type,params", [
    ({"message_type": "model_load_request", "request_id": "m1",
      "data": {"model_name": "tiny-sdxl", "device": "cpu"}},
     "model_load_response", {"model_name": "tiny-sdxl", "device": "cpu"}),
    ({"action": "load_model", "request_id": "m2", "model_name": "tiny-sdxl"},
     "model_load_response", {"model_name": "tiny-sdxl", "device": None}),
    ({"message_type": "status_request", "request_id": "s1"}, "status_response", {}),
    ({"action": "get_status"}, "status_response", {}),
    ({"message_type": "initialize", "request_id": "i1"}, "initialize_response", {}),
    ({"message_type": "cleanup", "request_id": "c1", "data": {"models": ["tiny-sdxl"]}},
     "cleanup_response", {"workers": None, "models": ["tiny-sdxl"]}),
    ({"action": "cleanup"}, "cleanup_response", {"workers": None, "models": None}),
    ({"message_type": "cancel_request", "request_id": "job-7"}, "cancel_response",
     {"request_id": "job-7"}),
    ({"message_type": "cancel_request", "request_id": "x1", "data": {"request_id": "job-8"}},
     "cancel_response", {"request_id": "job-8"}),
])
def test_management_messages(body, reply_type, params):
    parsed = parse_request(body)
    assert parsed.job is None
    assert parsed.reply_type == reply_type
    assert parsed.params == params
    assert parsed.message_type == (body.get("message_type") or body.get("action"))
    assert parsed.request_id == body.get("request_id")
