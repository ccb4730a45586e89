"""protocol.batching.batch_key: which jobs may share one pipeline call (dynamic batching).
The broker and the worker both decide with this one function."""

from __future__ import annotations

import pytest

from protocol.batching import batch_key
from protocol.job import Job


def job(**overrides) -> Job:
    fields = dict(request_id="r", prompt="a cat", models={"base": "tiny-sdxl"}, width=256, height=256,
                  steps=4, seed=1)
    fields.update(overrides)
    return Job.model_validate(fields)


@pytest.mark.parametrize("differs", [
    dict(request_id="other"), dict(prompt="a dog"), dict(prompt_2="b"), dict(negative_prompt="ugly"),
    dict(seed=99), dict(batch_size=3), dict(priority="high"), dict(timeout_s=5.0), dict(stream=True),
    dict(tags=("x",)), dict(output={"format": "jpeg", "return_images": True}),
    dict(postprocess={"auto_contrast": True, "upscale_factor": 2.0}), dict(device="cpu"),
    dict(form="nested"), dict(strength=0.3),   # strength without an init image does not matter
])
def test_what_each_image_keeps_for_itself_does_not_split_a_batch(differs):
    assert batch_key(job()) is not None
    assert batch_key(job(**differs)) == batch_key(job())


@pytest.mark.parametrize("differs", [
    dict(models={"base": "other"}), dict(models={"base": "tiny-sdxl", "refiner": "r"}),
    dict(models={"base": "tiny-sdxl", "vae": "v"}), dict(width=512), dict(height=512), dict(steps=5),
    dict(guidance_scale=5.0), dict(scheduler="DDIMScheduler"), dict(use_karras_sigmas=True),
    dict(clip_skip=2), dict(literal_prompt=True),
    dict(loras=[{"name": "a", "weight": 1.0}]), dict(textual_inversions=[{"name": "t"}]),
    dict(init_image="a.png"), dict(controlnets=[{"type": "canny", "image": "c.png"}]),
    dict(precision={"dtype": "bfloat16"}), dict(precision={"attention_slicing": True}),
])
def test_what_shapes_the_call_splits_a_batch(differs):
    assert batch_key(job(**differs)) != batch_key(job())


def test_lora_weights_images_and_strength_are_part_of_the_key():
    lora = lambda w: job(loras=[{"name": "a", "weight": w}])  # noqa: E731
    assert batch_key(lora(0.5)) == batch_key(lora(0.5)) != batch_key(lora(0.6))
    img = lambda image, strength=0.5: job(init_image=image, strength=strength)  # noqa: E731
    assert batch_key(img(b"\x89PNG same")) == batch_key(img(b"\x89PNG same"))
    assert batch_key(img(b"\x89PNG same")) != batch_key(img(b"\x89PNG other"))
    assert batch_key(img("x.png", 0.5)) != batch_key(img("x.png", 0.7))
    cn = lambda image, weight=1.0: job(controlnets=[{"type": "canny", "image": image, "weight": weight}])  # noqa: E731
    assert batch_key(cn("c.png")) == batch_key(cn("c.png")) != batch_key(cn("d.png"))
    assert batch_key(cn("c.png", 0.5)) != batch_key(cn("c.png"))


def test_prompt_lora_tags_and_previews_run_alone():
    assert batch_key(job(prompt="a cat <lora:tiny-lora-a:0.5>")) is None
    assert batch_key(job(negative_prompt="<LYCO:x>")) is None
    assert batch_key(job(prompt="a cat <lora:tiny-lora-a:0.5>", literal_prompt=True)) is not None
    assert batch_key(job(preview=True, stream=True)) is None
    # a weighted prompt (compel) batches: its embeddings are computed per job
    assert batch_key(job(prompt="(a cat:1.3)")) == batch_key(job())
