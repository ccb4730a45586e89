"""A1111/ComfyUI prompt syntax for real: (word:1.2), (word), [word], escapes, prompts past 77
tokens and <lora:name:w> tags, through compel into both SDXL encoders and the pooled embedding;
a request switch and a server switch take prompts literally."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_worker.prompt_syntax import extract_loras, parse_weights
from protocol.job import Job
from protocol.parse import parse_request

LONG_HEAD = " ".join(["zebra quilt vortex"] * 40)  # 120 CLIP tokens: far past one 75-token window


@pytest.mark.parametrize("prompt,expected", [
    ("a (cat:1.5) on [a mat]", [("a ", 1.0), ("cat", 1.5), (" on ", 1.0), ("a mat", 0.909091)]),
    ("((red)) house", [("red", 1.21), (" house", 1.0)]),
    ("a \\(literal\\) \\[x\\]", [("a (literal) [x]", 1.0)]),
    ("(open house", [("open house", 1.1)]),
    ("((a:1.5) b)", [("a", 1.65), (" b", 1.1)]),
    ("ratio 16:9, (masterpiece:1.2)", [("ratio 16:9, ", 1.0), ("masterpiece", 1.2)]),
])
def test_a1111_weights_parse_as_a1111_reads_them(prompt, expected):
    assert parse_weights(prompt) == expected


def test_lora_tags_are_taken_out():
    text, tags = extract_loras("a photo <lora:tiny-lora-a:0.8> of a cat, <lora:b> <lora:c:0.5:0.2>")
    assert text == "a photo of a cat"  # the separator left dangling goes too
    assert [(t.name, t.weight) for t in tags] == [("tiny-lora-a", 0.8), ("b", 1.0), ("c", 0.5)]


def test_every_form_carries_the_literal_switch():
    flat = {"message_type": "generate_sdxl_enhanced", "request_id": "f", "prompt": "p",
            "model_base": "tiny-sdxl", "literal_prompt": True}
    nested = {"message_type": "inference_request", "request_id": "n",
              "data": {"prompt": "p", "model_name": "tiny-sdxl", "literal_prompt": True}}
    legacy = {"action": "generate", "request_id": "l", "prompt_submission": {
        "model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p", "literal_prompt": True}}}
    for body in (flat, nested, legacy):
        job = parse_request(body).job
        assert job.literal_prompt is True, body
    flat.pop("literal_prompt")
    assert parse_request(flat).job.literal_prompt is False


# --- for real on the tiny kit ------------------------------------------------------------------

def make_job(prompt, **fields) -> Job:
    return Job.model_validate({**dict(request_id="w", prompt=prompt, negative_prompt="blurry",
                                      models={"base": "tiny-sdxl"}, width=128, height=128, steps=2, seed=4,
                                      precision={"dtype": "float32"}, scheduler="EulerDiscreteScheduler"),
                               **fields})


def run(executor, prompt, **fields) -> dict:
    return executor.run(make_job(prompt, **fields), lambda *a: None, lambda: False)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result["generated_images"][0]["path"]).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_compel_embeddings_match_diffusers_for_plain_text_and_weights_reach_both_encoders(executor):
    from gpu_worker.executor import PromptPlan

    pipe = executor._base("tiny-sdxl", torch.float32, pin=False)[1]  # the worker's cached base
    plain = pipe.encode_prompt("a photo of a cat", negative_prompt="blurry", device="cpu",
                               num_images_per_prompt=1, do_classifier_free_guidance=True)
    unit = PromptPlan.build(make_job("a photo of a (cat:1.0)"), literal=False).embeddings(pipe, refiner=False)
    assert torch.allclose(unit["prompt_embeds"], plain[0], atol=1e-5)
    assert torch.allclose(unit["negative_prompt_embeds"], plain[1], atol=1e-5)
    assert torch.allclose(unit["pooled_prompt_embeds"], plain[2], atol=1e-5)
    weighted = PromptPlan.build(make_job("a photo of a (cat:1.8)"), literal=False).embeddings(pipe, refiner=False)
    te1 = pipe.text_encoder.config.hidden_size
    for part in (slice(0, te1), slice(te1, None)):  # CLIP-L and OpenCLIP-G halves both weighted
        assert (weighted["prompt_embeds"][..., part] - plain[0][..., part]).abs().max() > 1e-3
    # the pooled embedding sees the text without the syntax, not "(cat:1.8)" literally
    assert torch.allclose(weighted["pooled_prompt_embeds"], plain[2], atol=1e-5)
    literal = pipe.encode_prompt("a photo of a (cat:1.8)", device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    assert (literal[2] - plain[2]).abs().max() > 1e-3


@pytest.mark.slow
def test_weighting_changes_the_image_and_the_switches_turn_it_off(executor):
    plain = pixels(run(executor, "a photo of a cat"))
    unit = run(executor, "a photo of a (cat:1.0)")
    assert np.abs(pixels(unit) - plain).max() <= 2  # weight 1: the same as diffusers' own encoding
    weighted = run(executor, "a photo of a (cat:1.8) [house]")
    assert np.abs(pixels(weighted) - plain).mean() > 1.0
    assert "prompt_weighting" in weighted["features_used"]
    text = Image.open(weighted["generated_images"][0]["path"]).text["parameters"]
    assert text.startswith("a photo of a (cat:1.8) [house]\n") and "Prompt weighting: compel" in text
    literal = run(executor, "a photo of a (cat:1.8) [house]", literal_prompt=True)
    assert np.abs(pixels(literal) - pixels(weighted)).mean() > 1.0
    assert "prompt_weighting" not in literal["features_used"]
    assert "Prompt weighting: off (literal prompt)" in Image.open(literal["generated_images"][0]["path"]).text["parameters"]
    executor.literal_prompts = True  # the server switch
    try:
        server_literal = run(executor, "a photo of a (cat:1.8) [house]")
    finally:
        executor.literal_prompts = False
    assert np.array_equal(pixels(server_literal), pixels(literal))
    escaped = run(executor, "a photo of a \\(cat\\)")
    assert np.array_equal(pixels(escaped), pixels(run(executor, "a photo of a (cat)", literal_prompt=True)))


@pytest.mark.slow
def test_prompts_past_77_tokens_are_not_cut(executor):
    a, b = LONG_HEAD + " red house", LONG_HEAD + " blue tree"
    cut_a, cut_b = (pixels(run(executor, p, literal_prompt=True)) for p in (a, b))
    assert np.array_equal(cut_a, cut_b)  # literally: diffusers cuts both at 77 tokens
    full_a = run(executor, a)
    assert "long_prompt" in full_a["features_used"]
    # the tails past token 77 count (a small share of three chunks on the random tiny model)
    assert np.abs(pixels(full_a) - pixels(run(executor, b))).mean() > 0.05


@pytest.mark.slow
def test_lora_tag_in_the_prompt_is_applied_like_a_request_lora(executor):
    tagged = run(executor, "a photo of a cat <lora:tiny-lora-a:0.8>")
    requested = run(executor, "a photo of a cat", loras=[{"name": "tiny-lora-a", "weight": 0.8}])
    assert np.array_equal(pixels(tagged), pixels(requested))
    assert tagged["processing_metrics"]["model_info"]["loras"][0]["name"] == "tiny-lora-a"
    assert "prompt_lora" in tagged["features_used"]
    text = Image.open(tagged["generated_images"][0]["path"]).text["parameters"]
    assert text.startswith("a photo of a cat <lora:tiny-lora-a:0.8>\n") and "Lora hashes: " in text
    plain = pixels(run(executor, "a photo of a cat"))
    assert np.abs(pixels(tagged) - plain).mean() > 1.0
    assert np.array_equal(pixels(run(executor, "a photo of a cat")), plain)  # nothing left behind
