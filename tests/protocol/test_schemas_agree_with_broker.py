"""Issue 15: protocol/schemas and the broker give the same verdict on the same body.

A corpus of bodies: every seed vector and C#-shaped example, thousands of random mutations of
them (this test's own generator: a field set to a value from a pool of near-valid and invalid
values, added or removed, guided by the schema's own property names), and hand-written
near-misses for every rule. For each body, schema-valid (the `jsonschema` package, draft 2020-12)
must equal broker-accepted (protocol.parse.parse_request, no --default-model-base, no pickle),
unless the broker's reasons are all rules docs/protocol.md lists as ones JSON Schema cannot
express; those reasons are checked to be in the docs.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import jsonschema
import pytest

from protocol import constants as C
from protocol import models as M
from protocol import rule_texts as R
from protocol import rules
from protocol import schema_gen
from protocol.errors import ProtocolError
from protocol.parse import parse_request

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(__file__).with_name("vectors")
DOCS = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")

# the broker's rules JSON Schema cannot state (protocol.rule_texts; docs/protocol.md lists them)
INEXPRESSIBLE = (
    R.PARALLEL_ARRAYS,  # equal lengths across sibling arrays
    R.LORA_NAME_OR_PATH,  # item i of one array paired with item i of another
    R.TI_NAME_OR_PATH,
    R.STEPS_STRENGTH,  # a product of two fields (steps * strength)
    R.INTEGER,  # JSON Schema counts 512.0 as the integer 512
)

_VALIDATORS = {}
for _stem, (_model, _mode) in schema_gen.SCHEMAS.items():
    if _mode == "validation":
        _schema = json.loads((schema_gen.SCHEMA_DIR / f"{_stem}.json").read_text())
        _VALIDATORS[_model] = jsonschema.Draft202012Validator(_schema)


def broker_verdict(body) -> tuple[bool, list[str]]:
    try:
        parse_request(body)
        return True, []
    except ProtocolError as exc:
        return False, [e.message for e in exc.errors] or [exc.message]


def schema_verdict(body) -> bool:
    if not isinstance(body, dict):
        return False
    mt = body.get("message_type")
    mt = mt if mt is not None else body.get("action")
    model = M.REQUEST_MODELS.get(mt) if isinstance(mt, str) else None
    if model is None:  # no schema may take a body the broker cannot even name
        return any(v.is_valid(body) for v in _VALIDATORS.values())
    return _VALIDATORS[model].is_valid(body)


def explained(messages: list[str]) -> bool:
    return bool(messages) and all(R.matching(m) in INEXPRESSIBLE for m in messages)


def check(body) -> str | None:
    """None when schema and broker agree (or differ only by a documented rule), else why not."""
    accepted, messages = broker_verdict(body)
    valid = schema_verdict(body)
    if accepted == valid:
        return None
    if not accepted and valid and explained(messages):
        return None
    side = "schema accepts, broker refuses" if valid else "schema refuses, broker accepts"
    return f"{side}: {messages} for {json.dumps(body, default=repr)[:600]}"


def test_the_inexpressible_rules_are_listed_in_the_docs():
    """In the section on what the schemas cannot say, in the words the errors use."""
    section = DOCS[DOCS.index("rules they cannot"):]
    section = section[:section.index("\n## ")]
    for rule in INEXPRESSIBLE:
        assert rule.message in section, rule.key
    # and they are the broker's words
    assert R.matching(rules.steps_strength_message(4, 0.1)) is R.STEPS_STRENGTH


# --- the corpus --------------------------------------------------------------------------------

FLAT_FULL = {
    "message_type": C.GENERATE_FLAT, "request_id": "r1", "prompt": "a fox", "model_base": "tiny-sdxl",
    "width": 512, "height": 768, "steps": 20, "guidance_scale": 6.5, "seed": 42,
    "scheduler": "DPM++ 2M Karras", "model_refiner": "tiny-sdxl-refiner", "refiner_switch": 0.8,
    "lora_names": ["tiny-lora-a", "tiny-lora-b"], "lora_weights": [0.8, 1.2],
    "controlnet_types": ["canny", "depth"], "controlnet_images": ["e.png", "d.png"],
    "controlnet_weights": [1.0, 0.5], "controlnet_preprocess": [True, False],
    "textual_inversion_names": ["tiny-ti"], "init_image": "i.png", "strength": 0.6,
    "mask_image": "m.png", "batch_size": 2, "output_format": "png", "output_quality": 90,
    "save_path": "outputs/run", "upscale_factor": 2.0, "upscale_method": "lanczos",
    "dtype": "float16", "priority": "high", "timeout": 120, "tags": ["a"], "stream": True}


def seed_bodies() -> list[dict]:
    bodies = [json.loads(p.read_text()) for p in sorted(VECTORS.glob("*.json"))]
    from protocol.translate import job_to_legacy, job_to_nested
    job = parse_request(FLAT_FULL).job
    bodies += [FLAT_FULL, job_to_nested(job), job_to_legacy(job),
               {"message_type": C.MODEL_LOAD, "data": {"model_name": "tiny-sdxl"}},
               {"action": "load_model", "model_name": "tiny-sdxl"},
               {"message_type": C.CANCEL, "data": {"request_id": "a1"}},
               {"message_type": C.CLEANUP, "data": {"workers": ["w-1"]}},
               {"message_type": C.STATUS}, {"action": "get_status"}, {"message_type": C.INITIALIZE}]
    return bodies


POOL = [None, True, False, 0, 1, -1, 2, 7, 8, 255, 256, 512, 2048, 2049, 513, 150, 151, 512.0, 0.5,
        0.05, 1.0, 0.0, 1.5, 4.0, 4.5, 6, 30.0, 30.5, -2.0, -2.5, 2**63 - 1, 2**63, "", " ", "x",
        "PNG", " Jpg ", "gif", "fp16", "HALF", "Auto", "float8", " high ", "urgent", "DDIM",
        "euler  a", "dpm++ 2m karras", "Bogus Sampler", "openpose", "Canny", "tiles", "../x.png",
        "a/../../b.png", "a..b.png", "x.ckpt", "m.PTH", "m.safetensors", "outputs/", "/abs/x",
        "c:\\x", "http://h/x", "lanczos", "Real-ESRGAN", "4x-UltraSharp", "generate",
        C.GENERATE_FLAT, C.GENERATE_NESTED, "preview", [], [1], ["a"], [None], ["a", "b"],
        [0.5, 3.0], [True, None], {}, {"enabled": True}, {"enabled": False, "factor": 2.0},
        {"enabled": True, "factor": 9}, {"name": "x"}, {"path": "../y.safetensors"}]


def _schema_for(validator, path: list) -> dict | None:
    """The (resolved) object schema at `path` in a request schema, to learn its field names."""
    schema, root = validator.schema, validator.schema
    for key in path:
        schema = _resolve(schema, root)
        if isinstance(key, int):
            schema = schema.get("items", {})
        else:
            schema = schema.get("properties", {}).get(key, {})
    return _resolve(schema, root)


def _resolve(schema: dict, root: dict) -> dict:
    for _ in range(5):
        if "$ref" in schema:
            schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in schema:
            objects = [s for s in schema["anyOf"] if s.get("type") in ("object", "array") or "$ref" in s]
            schema = objects[0] if objects else schema
            if not objects:
                break
        else:
            break
    return schema


def _containers(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                yield from _containers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, (dict, list)):
                yield from _containers(value, (*path, i))


def mutate(body: dict, rng: random.Random) -> dict:
    body = copy.deepcopy(body)
    validator = _VALIDATORS.get(M.REQUEST_MODELS.get(body.get("message_type") or body.get("action")))
    for _ in range(rng.randint(1, 3)):
        path, node = rng.choice([c for c in _containers(body) if isinstance(c[1], dict)])
        names = list(node)
        if validator is not None:
            names += list((_schema_for(validator, list(path)) or {}).get("properties", {}))
        if not names:
            continue
        key = rng.choice(names)
        if rng.random() < 0.15:
            node.pop(key, None)
        else:
            node[key] = copy.deepcopy(rng.choice(POOL))
    return body


def test_generated_bodies_get_the_same_verdict():
    rng = random.Random(15)
    seeds = seed_bodies()
    problems, accepted = [], 0
    for i in range(3000):
        body = seeds[i % len(seeds)] if i < len(seeds) else mutate(rng.choice(seeds), rng)
        accepted += broker_verdict(body)[0]
        problem = check(body)
        if problem:
            problems.append(problem)
    assert not problems, f"{len(problems)} disagreements, first ones:\n" + "\n".join(problems[:8])
    assert accepted > 300  # the corpus holds valid bodies too, not only broken ones


# hand-written near-misses: (body, broker accepts?) for every rule, both sides of each line
def flat(**fields):
    return {"message_type": C.GENERATE_FLAT, "prompt": "p", "model_base": "tiny-sdxl", **fields}


def nested(**data):
    return {"message_type": C.GENERATE_NESTED, "data": {"prompt": "p", "model_name": "tiny-sdxl", **data}}


def legacy(cond=None, **parts):
    return {"action": "generate", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p", **(cond or {})}, **parts}}


NEAR_MISSES = [
    ({k: v for k, v in flat().items() if k != "message_type"}, False),  # no type at all
    ({**flat(), "message_type": None, "action": C.GENERATE_FLAT}, False),
    ({**flat(), "message_type": "Generate_SDXL_Enhanced"}, False),
    ({"message_type": "generate", **legacy()}, True), (legacy(), True),
    (flat(prompt="   "), False), (flat(prompt=" a "), True),
    (flat(model_base=None), False), ({k: v for k, v in flat().items() if k != "model_base"}, False),
    (flat(width=512.0), False), (flat(width=512), True), (flat(width=516), False), (flat(width=248), False),
    (flat(steps=0), False), (flat(steps=150), True), (flat(guidance_scale=30.01), False),
    (flat(seed=2**63 - 1), True), (flat(seed=2**63), False), (flat(seed=-2), False),
    (flat(scheduler="euler  A"), True), (flat(scheduler="Euler b"), False),
    (flat(scheduler=" DPM++ 2M Karras "), True),
    (flat(output_format="PNG"), True), (flat(output_format=" jpg"), True), (flat(output_format="gif"), False),
    (flat(dtype="fp16"), True), (flat(dtype="BF16"), True), (flat(dtype="fp8"), False),
    (flat(priority="HIGH"), True), (flat(priority="urgent"), False),
    (flat(refiner_switch=0.0), False), (flat(refiner_switch=1.0), False), (flat(refiner_switch=0.5), True),
    (flat(upscale_factor=4.0), True), (flat(upscale_factor=4.5), False), (flat(upscale_factor=0.5), False),
    (flat(upscale_method="Real-ESRGAN"), True), (flat(upscale_method="4x-UltraSharp"), True),
    (flat(upscale_method="../u.safetensors"), False), (flat(upscale_method="u.pth"), False),
    (flat(save_path="../x"), False), (flat(save_path="/abs"), False), (flat(save_path="c:\\x"), False),
    (flat(save_path="a/b"), True), (flat(save_path="a..b"), True),
    (flat(mask_image="m.png"), False), (flat(mask_image="m.png", init_image="i.png"), True),
    (flat(mask_image="m.png", init_image=None), False),
    (flat(init_image="../i.png"), False), (flat(init_image="sub/i.png"), True),
    (flat(lora_names=["a"], lora_paths=["loras/a.ckpt"]), False),
    (flat(lora_names=["a"], lora_paths=["loras/a.safetensors"]), True),
    (flat(lora_names=["a"], lora_paths=["../a.safetensors"]), False),
    (flat(lora_weights=[0.5]), False), (flat(lora_names=["a"], lora_weights=[2.5]), False),
    (flat(controlnet_types=["depth"]), False),
    (flat(controlnet_types=["OpenPose"], controlnet_images=["p.png"]), True),
    (flat(controlnet_types=["tiles"], controlnet_images=["p.png"]), False),
    (flat(controlnet_types=[""], controlnet_images=["p.png"]), True),
    (flat(controlnet_preprocess=[False], controlnet_images=["p.png"]), True),
    (flat(controlnet_preprocess=[False]), False),
    (flat(model_vae="vae.ckpt"), False), (flat(model_vae="VAE.Bin"), False),
    (flat(timeout=0), False), (flat(timeout=86400), True), (flat(stream="preview"), True),
    (flat(stream="yes"), False), (flat(tags=["a"] * 65), False), (flat(unknown_field=1), True),
    (nested(), True), (nested(model_name=None), False),
    (nested(model_name=None, models={"base": "tiny-sdxl"}), True),
    (nested(controlnet={"enabled": True}), False),
    (nested(controlnet={"enabled": True, "control_image": "c.png"}), True),
    (nested(controlnet={"enabled": False}), True),
    (nested(controlnets=[{"type": "depth"}]), False), (nested(controlnets=[{"enabled": False}]), True),
    (nested(controlnets=[{"control_image": "c.png", "preprocessor": {"enabled": False}}]), True),
    (nested(output={"upscale": {"enabled": True}}), False),
    (nested(output={"upscale": {"enabled": True, "factor": 2}}), True),
    (nested(postprocessing={"upscale": {"enabled": True, "factor": 5}}), False),
    (nested(mask_image="m.png"), False), (nested(worker_type="SDXL_WORKER"), True),
    (nested(worker_type="gpu_worker"), False),
    (nested(hyperparameters={"refiner_switch": 1.0}), False),
    (nested(precision={"dtype": "Float16"}), True), (nested(lora={"models": [{"weight": 1.0}]}), False),
    (legacy({"mask_image": "m.png"}), False), (legacy({"loras": [{"weight": 0.5}]}), False),
    (legacy({"loras": [{"path": "loras/x.safetensors"}]}), True),
    (legacy({"controlnets": [{"type": "depth", "image": "d.png", "preprocess": False}]}), True),
    (legacy({"controlnets": [{"type": "depth"}]}), False),
    (legacy(hyperparameters={"steps": 10.0}), False),
    ({"action": "generate", "prompt_submission": {"conditioning": {"prompt": "p"}}}, False),
    ({"message_type": C.MODEL_LOAD}, False), ({"message_type": C.MODEL_LOAD, "model_name": "m"}, True),
    ({"action": "load_model", "data": {"model_name": "m"}}, True),
    ({"message_type": C.CANCEL}, False), ({"message_type": C.CANCEL, "request_id": "x"}, True),
    ({"message_type": C.STATUS, "action": "get_status"}, True), ({"action": "status"}, False),
]


@pytest.mark.parametrize("body, accepted", NEAR_MISSES)
def test_near_misses_get_the_same_verdict(body, accepted):
    assert broker_verdict(body)[0] is accepted, broker_verdict(body)
    problem = check(body)
    assert problem is None, problem


def test_reply_enums_are_open():
    for stem in ("reply.progress", "reply.final", "reply.status"):
        text = (schema_gen.SCHEMA_DIR / f"{stem}.json").read_text()
        assert '"enum"' not in text, stem
    progress = jsonschema.Draft202012Validator(
        json.loads((schema_gen.SCHEMA_DIR / "reply.progress.json").read_text()))
    assert progress.is_valid({"message_type": "progress", "request_id": "r", "final": False,
                              "stage": "upscaling", "step": 0, "total_steps": 0})
