"""Every form, every feature (issue 15), over the wire on the tiny kit (real serve, real worker).

1. One rich request written by hand in the flat, nested and legacy forms: the same canonical job,
   and byte-identical images.
2. Every pair of feature values that can meet in one request, in a pairwise covering set made
   by allpairspy (a few dozen requests instead of every combination), each checked on what the
   client sees: success, one image per batch item in the asked format and size, the features
   the worker reports (and the ones it must not), the LoRAs applied with their weights and
   layout, the upscaler, previews in the progress stream, preprocess warnings. The pairs that
   cannot meet are `CANNOT_MEET` (also in docs/protocol.md), and the broker refuses them.
   About 50 requests; 4-5 minutes on a loaded 2-core box.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from allpairspy import AllPairs
from PIL import Image

from protocol import constants as C
from protocol.errors import ValidationFailed
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

# most values first: allpairspy's greedy search covers every pair that way; the first value of
# each factor is its "off" value (what a completion row uses for the factors it does not test)
FACTORS = {
    # the ten diffusers classes, and A1111 sampler names (a Karras one, an ancestral one)
    "scheduler": [*C.SCHEDULERS, "DPM++ 2M SDE Karras", "Euler a"],
    "controlnet": ["none", "canny", "depth", "canny+depth"],
    "lora": [0, 1, 2, "kohya"],  # "kohya": the kit's LoRA in the kohya/A1111 layout
    # A1111 prompt syntax: (word:1.2) weighting, a <lora:name:w> tag, literal_prompt (no syntax)
    "prompt": ["plain", "weighted", "lora_tag", "literal"],
    "form": [C.FORM_FLAT, C.FORM_NESTED, C.FORM_LEGACY],
    "mode": ["txt2img", "img2img", "inpaint"],
    "upscale": [False, "lanczos", "tiny-esrgan"],  # tiny-esrgan: the kit's model upscaler
    "preprocess": [None, True, False],  # each ControlNet's preprocess switch (None: not sent)
    "batch": [1, 2],
    "refiner": [False, True],
    "textual_inversion": [False, True],
    "vae": [False, True],
    "preview": [False, True],  # progress events carry preview images
    "format": list(C.OUTPUT_FORMATS),
}
NAMES = list(FACTORS)

# pairs of values that cannot meet in one request, and why (docs/protocol.md repeats this list)
NO_CONTROLNET = "a preprocess switch belongs to a ControlNet: without one there is nothing to switch"
CANNOT_MEET: dict[tuple[tuple[str, object], tuple[str, object]], str] = {
    (("controlnet", "none"), ("preprocess", True)): NO_CONTROLNET,
    (("controlnet", "none"), ("preprocess", False)): NO_CONTROLNET,
}


def _allowed(row: list) -> bool:
    """allpairspy's filter: False for a (partial) row holding a pair that cannot meet."""
    values = dict(zip(NAMES, row))
    return not any(values.get(a, object()) == va and values.get(b, object()) == vb
                   for (a, va), (b, vb) in CANNOT_MEET)


def _pair_allowed(a: str, va, b: str, vb) -> bool:
    return ((a, va), (b, vb)) not in CANNOT_MEET and ((b, vb), (a, va)) not in CANNOT_MEET


def _pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]}


def _allowed_pairs() -> set:
    """Every pair of values of two factors that is not in CANNOT_MEET."""
    return {((a, va), (b, vb)) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]
            for va in FACTORS[a] for vb in FACTORS[b] if _pair_allowed(a, va, b, vb)}


def _row_with(a: str, va, b: str, vb) -> dict:
    """A row holding the pair, every other factor at its first value that it can meet."""
    row = {a: va, b: vb}
    for name in NAMES:
        if name not in row:
            row[name] = next(v for v in FACTORS[name] if _allowed([{**row, name: v}.get(n) for n in NAMES]))
    return {n: row[n] for n in NAMES}


def covering_rows() -> list[dict]:
    """allpairspy's covering set; its greedy search with a filter can leave a few pairs out, so
    each of those gets a row of its own (the pair, everything else off where it can be)."""
    rows = [dict(zip(NAMES, row)) for row in AllPairs(list(FACTORS.values()), filter_func=_allowed)]
    covered = set().union(*map(_pairs, rows))
    for (a, va), (b, vb) in sorted(_allowed_pairs() - covered, key=repr):
        if ((a, va), (b, vb)) not in covered:
            rows.append(_row_with(a, va, b, vb))
            covered |= _pairs(rows[-1])
    return rows


PROMPTS = {"plain": "a castle", "weighted": "a (castle:1.3) at [dawn]",
           "lora_tag": "a castle <lora:tiny-lora-b:0.6>", "literal": "a (castle:1.3) at [dawn]"}
LORAS = {0: [], 1: ["tiny-lora-a"], 2: ["tiny-lora-a", "tiny-lora-b"], "kohya": ["tiny-lora-kohya"]}


def flat_body(row: dict, number: int) -> dict:
    prompt = PROMPTS[row["prompt"]] + (" <tiny-ti>" if row["textual_inversion"] else "")
    body = {"message_type": C.GENERATE_FLAT, "request_id": f"pairwise-{number}", "prompt": prompt,
            "model_base": "tiny-sdxl", "width": SIZE, "height": SIZE, "steps": STEPS,
            "seed": 100 + number, "scheduler": row["scheduler"], "batch_size": row["batch"],
            "output_format": row["format"], "return_images": True}
    if row["prompt"] == "literal":
        body["literal_prompt"] = True
    if row["mode"] in ("img2img", "inpaint"):
        body.update(init_image="photo.png", strength=0.7)
    if row["mode"] == "inpaint":
        body["mask_image"] = "mask.png"
    if row["refiner"]:
        body.update(model_refiner="tiny-sdxl-refiner", refiner_switch=0.5)
    if row["lora"]:
        names = LORAS[row["lora"]]
        body.update(lora_names=names, lora_weights=[0.8, 0.5][:len(names)])
    if row["controlnet"] != "none":
        kinds = row["controlnet"].split("+")
        body.update(controlnet_types=kinds,
                    controlnet_images=["photo.png" if k == "canny" else "depth.png" for k in kinds])
        if row["preprocess"] is not None:
            body["controlnet_preprocess"] = [row["preprocess"]] * len(kinds)
    if row["textual_inversion"]:
        body["textual_inversion_names"] = ["tiny-ti"]
    if row["vae"]:
        body["model_vae"] = "tiny-vae"
    if row["upscale"]:
        body.update(upscale_factor=2.0, upscale_method=row["upscale"])
    if row["preview"]:
        body.update(preview=True, preview_interval_ms=0)  # a preview at every step
    return body


def in_form(body: dict, form: str) -> dict:
    job = parse_request(body).job
    if form == C.FORM_NESTED:
        return job_to_nested(job)
    if form == C.FORM_LEGACY:
        return job_to_legacy(job)
    return body


TAG_LORA = ("tiny-lora-b", 0.6)  # the <lora:> tag in PROMPTS["lora_tag"]


def applied_loras(row: dict) -> list[tuple[str, float]]:
    """(name, weight) of each LoRA the worker applies: the request's, then the prompt tag's
    unless the request names that LoRA already (docs/models.md: the request's wins)."""
    loras = list(zip(LORAS[row["lora"]], [0.8, 0.5]))
    if row["prompt"] == "lora_tag" and TAG_LORA[0] not in LORAS[row["lora"]]:
        loras.append(TAG_LORA)
    return loras


def lora_count(row: dict) -> int:
    return len(applied_loras(row))


def expected_features(row: dict) -> set[str]:
    features = {row["mode"]}
    if row["batch"] > 1:
        features.add("batch")
    if row["refiner"]:
        features.add("refiner")
    if lora_count(row):
        features.add("lora" if lora_count(row) == 1 else "multi_lora")
    if row["prompt"] == "lora_tag" and TAG_LORA[0] not in LORAS[row["lora"]]:
        features.add("prompt_lora")
    if row["prompt"] == "weighted":
        features.add("prompt_weighting")
    if row["controlnet"] != "none":
        features.add("multi_controlnet" if "+" in row["controlnet"] else "controlnet")
    if "canny" in row["controlnet"] and row["preprocess"] is not False:
        features.add("canny_preprocess")  # photo.png is a picture, not an edge map
    if row["textual_inversion"]:
        features.add("textual_inversion")
    if row["vae"]:
        features.add("custom_vae")
    if row["upscale"]:
        features.add("upscale_lanczos" if row["upscale"] == "lanczos" else "upscale_realesrgan")
    return features


def unexpected_features(row: dict) -> set[str]:
    """Features a row must not report: a step the request switched off or did not ask for."""
    features = set()
    if row["prompt"] in ("plain", "literal"):
        features.add("prompt_weighting")  # literal_prompt: the parentheses are plain text
    if row["preprocess"] is False or "canny" not in row["controlnet"]:
        features.add("canny_preprocess")
    if row["prompt"] != "lora_tag" or TAG_LORA[0] in LORAS[row["lora"]]:
        features.add("prompt_lora")
    return features


ROWS = covering_rows()


def test_the_covering_set_covers_every_pair_that_can_meet():
    """Checked here rather than trusted: every allowed pair of values is in some row, and no row
    holds a pair that cannot meet."""
    covered = set().union(*map(_pairs, ROWS))
    assert _allowed_pairs() <= covered
    assert all(_allowed([row[n] for n in NAMES]) for row in ROWS)
    assert not any(pair in covered or pair[::-1] in covered for pair in CANNOT_MEET)
    assert len(ROWS) <= 70  # a covering set, not the full product (millions of rows)


def test_every_pair_that_cannot_meet_is_refused_as_the_docs_say():
    """The listed pairs are refused by the broker, not just left out of the suite."""
    row = _row_with("preprocess", False, "batch", 1) | {"controlnet": "none"}
    body = flat_body(row, 0) | {"controlnet_preprocess": [False]}
    with pytest.raises(ValidationFailed) as refused:
        parse_request(body)
    assert [e.field for e in refused.value.errors] == ["controlnet_images"]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert NO_CONTROLNET in docs


@pytest.mark.parametrize("number", range(len(ROWS)))
def test_pairwise_row(client, number):
    row = ROWS[number]
    progress = []
    reply = client.request(in_form(flat_body(row, number), row["form"]), on_progress=progress.append)
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
    assert not unexpected_features(row) & features, (row, features)
    if row["batch"] > 1:  # two seeds, two different images
        assert (pixels(images[0]) != pixels(images[1])).any()
    info = reply["data"]["processing_metrics"]["model_info"]
    loras = info.get("loras") or []
    assert [(lora["name"], lora["weight"]) for lora in loras] == applied_loras(row), loras
    if row["lora"] == "kohya":
        assert loras[0]["format"] == "kohya", loras
    if row["upscale"] == "tiny-esrgan":
        assert info["upscaler"] == "tiny-esrgan"
    previews = [p["preview"] for p in progress if p.get("preview")]
    assert bool(previews) == row["preview"], (row, [p.get("stage") for p in progress])
    if row["preprocess"] is True and "depth" in row["controlnet"]:
        assert any("no depth preprocessor" in w for w in reply["warnings"]), reply["warnings"]


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
