"""Every form, every feature (issue 15), over the wire on the tiny kit (real serve, real worker).

1. One rich request written by hand in the flat, nested and legacy forms: the same canonical job,
   and byte-identical images.
2. Every pair of feature values that can meet in one request, in a pairwise covering set made
   by allpairspy (a few dozen requests instead of every combination), each checked on what the
   client sees: success, one image per batch item in the asked format and size, the features
   the worker reports. The pairs that cannot meet are `CANNOT_MEET` (also in docs/protocol.md).
"""

from __future__ import annotations

import io

import pytest
from allpairspy import AllPairs
from PIL import Image

from protocol import constants as C
from protocol.parse import parse_request
from protocol.translate import job_to_legacy, job_to_nested
from tests.conformance.conftest import image_bytes, pixels

pytestmark = pytest.mark.slow

SIZE, STEPS = 256, 3

# --- 1. the same request in the three forms ------------------------------------------------------

FLAT = {"message_type": C.GENERATE_FLAT, "request_id": "forms-flat", "prompt": "a fox <tiny-ti>",
        "negative_prompt": "blurry", "model_base": "tiny-sdxl", "model_vae": "tiny-vae",
        "width": SIZE, "height": SIZE, "steps": 4, "guidance_scale": 6.0, "seed": 21,
        "scheduler": "EulerDiscreteScheduler", "init_image": "photo.png", "strength": 0.75,
        "lora_names": ["tiny-lora-a"], "lora_weights": [0.7],
        "controlnet_types": ["depth"], "controlnet_images": ["depth.png"],
        "controlnet_weights": [0.8], "controlnet_preprocess": [False],
        "textual_inversion_names": ["tiny-ti"], "batch_size": 2, "upscale_factor": 2.0,
        "output_format": "webp", "return_images": True}

NESTED = {"message_type": C.GENERATE_NESTED, "request_id": "forms-nested", "data": {
    "prompt": "a fox <tiny-ti>", "negative_prompt": "blurry",
    "models": {"base": "tiny-sdxl", "vae": "tiny-vae"},
    "dimensions": {"width": SIZE, "height": SIZE},
    "hyperparameters": {"num_inference_steps": 4, "guidance_scale": 6.0, "seed": 21, "strength": 0.75},
    "scheduler": "EulerDiscreteScheduler", "init_image": "photo.png",
    "lora": {"enabled": True, "models": [{"name": "tiny-lora-a", "weight": 0.7}]},
    "controlnet": {"enabled": True, "type": "depth", "control_image": "depth.png",
                   "conditioning_scale": 0.8, "preprocessor": {"enabled": False}},
    "textual_inversions": [{"name": "tiny-ti"}], "batch": {"size": 2},
    "postprocessing": {"upscale": {"enabled": True, "factor": 2.0}},
    "output": {"format": "webp", "return_images": True}}}

LEGACY = {"action": "generate", "session_id": "forms-legacy", "prompt_submission": {
    "model": {"base": "tiny-sdxl", "vae": "tiny-vae"},
    "conditioning": {"prompt": "a fox <tiny-ti>", "negative_prompt": "blurry",
                     "init_image": "photo.png", "loras": [{"name": "tiny-lora-a", "weight": 0.7}],
                     "controlnets": [{"type": "depth", "image": "depth.png", "weight": 0.8,
                                      "preprocess": False}],
                     "textual_inversions": [{"name": "tiny-ti"}]},
    "hyperparameters": {"width": SIZE, "height": SIZE, "steps": 4, "guidance_scale": 6.0,
                        "seed": 21, "strength": 0.75, "scheduler": "EulerDiscreteScheduler",
                        "batch_size": 2},
    "postprocessing": {"upscale_factor": 2.0}, "output": {"format": "webp", "return_images": True}}}

# where the forms differ by nature: who they are, how they were written, where fields came from
_NOT_THE_JOB = {"request_id", "form", "explicit", "sources", "worker_type"}


def canonical(body: dict) -> dict:
    return parse_request(body).job.model_dump(exclude=_NOT_THE_JOB)


def test_three_forms_give_one_canonical_job():
    assert canonical(FLAT) == canonical(NESTED) == canonical(LEGACY)


def test_three_forms_give_byte_identical_images(client):
    replies = [client.request(body) for body in (FLAT, NESTED, LEGACY)]
    for reply in replies:
        assert reply["success"], (reply["error_code"], reply["error"], reply["errors"])
    assert [r["message_type"] for r in replies] == [
        "generate_sdxl_enhanced_response", "inference_response", "generate_response"]
    images = [r["data"]["generated_images"] for r in replies]
    assert all(len(batch) == 2 for batch in images)
    for index in range(2):
        encoded = {image_bytes(batch[index]) for batch in images}
        assert len(encoded) == 1, f"image {index} differs between the forms"
        assert len({batch[index]["sha256"] for batch in images}) == 1
    assert (images[0][0]["width"], images[0][0]["height"]) == (2 * SIZE, 2 * SIZE)
    features = set(replies[0]["data"]["features_used"])
    assert {"img2img", "lora", "controlnet", "textual_inversion", "custom_vae", "batch"} <= features


# --- 2. a pairwise covering set of features ------------------------------------------------------

# most values first: allpairspy's greedy search covers every pair that way
FACTORS = {
    "scheduler": list(C.SCHEDULERS),
    "controlnet": ["none", "canny", "depth", "canny+depth"],
    "form": [C.FORM_FLAT, C.FORM_NESTED, C.FORM_LEGACY],
    "mode": ["txt2img", "img2img", "inpaint"],
    "batch": [1, 2],
    "refiner": [False, True],
    "lora": [0, 1, 2],
    "textual_inversion": [False, True],
    "vae": [False, True],
    "upscale": [False, True],
    "format": list(C.OUTPUT_FORMATS),
}
NAMES = list(FACTORS)

# pairs of values that cannot meet in one request, and why (docs/protocol.md repeats this
# list): none today. Refiner x img2img-with-ControlNet used to be one (that diffusers pipeline
# has no denoising_end); the worker now refines after it instead.
CANNOT_MEET: dict[tuple[tuple[str, object], tuple[str, object]], str] = {}


def _allowed(row: list) -> bool:
    """allpairspy's filter: False for a (partial) row holding a pair that cannot meet."""
    values = dict(zip(NAMES, row))
    return not any(values.get(a) == va and values.get(b) == vb for (a, va), (b, vb) in CANNOT_MEET)


def _pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]}


def _allowed_pairs() -> set:
    """Every pair of values, with every other factor at its first ("off") value, that may meet."""
    out = set()
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1:]:
            for va in FACTORS[a]:
                for vb in FACTORS[b]:
                    probe = {n: FACTORS[n][0] for n in NAMES} | {a: va, b: vb}
                    if _allowed([probe[n] for n in NAMES]):
                        out.add(((a, va), (b, vb)))
    return out


def covering_rows() -> list[dict]:
    """allpairspy's covering set; its greedy search with a filter can leave a few pairs out, so
    each of those gets a row of its own (the pair, everything else off)."""
    rows = [dict(zip(NAMES, row)) for row in AllPairs(list(FACTORS.values()), filter_func=_allowed)]
    covered = set().union(*map(_pairs, rows))
    for (a, va), (b, vb) in sorted(_allowed_pairs() - covered, key=repr):
        if ((a, va), (b, vb)) not in covered:
            rows.append({n: FACTORS[n][0] for n in NAMES} | {a: va, b: vb})
            covered |= _pairs(rows[-1])
    return rows


def flat_body(row: dict, number: int) -> dict:
    body = {"message_type": C.GENERATE_FLAT, "request_id": f"pairwise-{number}",
            "prompt": "a castle <tiny-ti>" if row["textual_inversion"] else "a castle",
            "model_base": "tiny-sdxl", "width": SIZE, "height": SIZE, "steps": STEPS,
            "seed": 100 + number, "scheduler": row["scheduler"], "batch_size": row["batch"],
            "output_format": row["format"], "return_images": True}
    if row["mode"] in ("img2img", "inpaint"):
        body.update(init_image="photo.png", strength=0.7)
    if row["mode"] == "inpaint":
        body["mask_image"] = "mask.png"
    if row["refiner"]:
        body.update(model_refiner="tiny-sdxl-refiner", refiner_switch=0.5)
    if row["lora"]:
        body.update(lora_names=["tiny-lora-a", "tiny-lora-b"][:row["lora"]],
                    lora_weights=[0.8, 0.5][:row["lora"]])
    if row["controlnet"] != "none":
        kinds = row["controlnet"].split("+")
        body.update(controlnet_types=kinds,
                    controlnet_images=["photo.png" if k == "canny" else "depth.png" for k in kinds])
    if row["textual_inversion"]:
        body["textual_inversion_names"] = ["tiny-ti"]
    if row["vae"]:
        body["model_vae"] = "tiny-vae"
    if row["upscale"]:
        body["upscale_factor"] = 2.0
    return body


def in_form(body: dict, form: str) -> dict:
    job = parse_request(body).job
    if form == C.FORM_NESTED:
        return job_to_nested(job)
    if form == C.FORM_LEGACY:
        return job_to_legacy(job)
    return body


def expected_features(row: dict) -> set[str]:
    features = {row["mode"]}
    if row["batch"] > 1:
        features.add("batch")
    if row["refiner"]:
        features.add("refiner")
    if row["lora"]:
        features.add("lora" if row["lora"] == 1 else "multi_lora")
    if row["controlnet"] != "none":
        features.add("multi_controlnet" if "+" in row["controlnet"] else "controlnet")
    if "canny" in row["controlnet"]:
        features.add("canny_preprocess")  # photo.png is a picture, not an edge map
    if row["textual_inversion"]:
        features.add("textual_inversion")
    if row["vae"]:
        features.add("custom_vae")
    if row["upscale"]:
        features.add("upscale_lanczos")
    return features


ROWS = covering_rows()


def test_the_covering_set_covers_every_pair_that_can_meet():
    """Checked here rather than trusted: every allowed pair of values is in some row, and no row
    holds a pair that cannot meet."""
    covered = set().union(*map(_pairs, ROWS))
    assert _allowed_pairs() <= covered
    assert all(_allowed([row[n] for n in NAMES]) for row in ROWS)
    assert len(ROWS) < 60  # a covering set, not the full product


@pytest.mark.parametrize("number", range(len(ROWS)))
def test_pairwise_row(client, number):
    row = ROWS[number]
    reply = client.request(in_form(flat_body(row, number), row["form"]))
    assert reply["success"], (row, reply["error_code"], reply["error"], reply["errors"])
    images = reply["data"]["generated_images"]
    assert len(images) == row["batch"], row
    side = SIZE * (2 if row["upscale"] else 1)
    for image in images:
        assert image["format"] == row["format"]
        with Image.open(io.BytesIO(image_bytes(image))) as decoded:
            assert decoded.format.lower() == row["format"] and decoded.size == (side, side)
    features = set(reply["data"]["features_used"])
    assert expected_features(row) <= features, (row, features)
    if row["batch"] > 1:  # two seeds, two different images
        assert (pixels(images[0]) != pixels(images[1])).any()


def test_refiner_after_a_controlnet_in_every_form(client):
    """The SDXL ControlNet img2img pipeline cannot hand its latents over mid-way (no
    denoising_end); the refiner then refines the finished image (img2img over the last
    1 - refiner_switch), and the client is told. txt2img with a ControlNet hands over as usual."""
    row = {n: FACTORS[n][0] for n in NAMES} | {"refiner": True, "controlnet": "depth", "batch": 2,
                                               "mode": "img2img"}
    for number, form in enumerate((C.FORM_FLAT, C.FORM_NESTED, C.FORM_LEGACY), start=997):
        reply = client.request(in_form(flat_body(row, number), form))
        assert reply["success"], (form, reply["error"])
        assert {"refiner", "refiner_after_base", "controlnet"} <= set(reply["data"]["features_used"])
        assert any("refiner ran after" in w for w in reply["warnings"])
        assert len(reply["data"]["generated_images"]) == 2
