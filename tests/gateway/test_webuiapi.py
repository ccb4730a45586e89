"""The real `webuiapi` package (the A1111 client people script with) against the gateway of a
real `serve --http` with a cpu worker on the tiny kit: txt2img, img2img with a mask, ControlNet,
progress polling, models and options."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(real_rig):
    import webuiapi

    host, port = real_rig.url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), steps=4)


def test_txt2img_with_a_lora_tag_gets_images_and_a1111_info(api):
    result = api.txt2img(prompt="a red fox <lora:tiny-lora-a:0.7>", width=256, height=256, steps=3,
                         seed=11, sampler_name="Euler a", batch_size=2)
    assert len(result.images) == 2
    assert all(image.size == (256, 256) for image in result.images)
    assert result.info["seed"] == 11 and result.info["all_seeds"] == [11, 12]
    assert result.info["sd_model_name"] == "tiny-sdxl"
    assert result.parameters["prompt"] == "a red fox <lora:tiny-lora-a:0.7>"


def test_img2img_with_a_mask_changes_only_the_masked_part(api):
    base = Image.new("RGB", (256, 256), (30, 90, 200))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    result = api.img2img(images=[base], mask_image=mask, prompt="a cat", width=256, height=256,
                         steps=3, denoising_strength=0.9, seed=3)
    out = result.images[0].convert("RGB")
    assert out.size == (256, 256)
    # diffusers' inpainting keeps the unmasked area close to the input, the masked one not
    corner, centre = out.getpixel((5, 5)), out.getpixel((128, 128))
    assert sum(abs(a - b) for a, b in zip(corner, (30, 90, 200))) < 60, corner
    assert sum(abs(a - b) for a, b in zip(centre, (30, 90, 200))) > 30, centre


def test_controlnet_unit_runs(api):
    import webuiapi

    control = Image.new("RGB", (256, 256), (0, 0, 0))
    control.paste((255, 255, 255), (64, 64, 192, 192))
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model="tiny-canny", weight=0.8)
    result = api.txt2img(prompt="edges", width=256, height=256, steps=2, seed=4,
                         controlnet_units=[unit])
    assert result.images[0].size == (256, 256)
    assert not [w for w in result.info["warnings"] if "ControlNet" in w]


def test_enable_hr_upscales_and_refiner_checkpoint_refines(api):
    hires = api.txt2img(prompt="a fox", width=256, height=256, steps=2, seed=5, enable_hr=True,
                        hr_scale=2, hr_upscaler="Lanczos")
    assert hires.images[0].size == (512, 512)
    assert "upscale_lanczos" in hires.info["features_used"]
    assert any("enable_hr" in w for w in hires.info["warnings"])
    # webuiapi has no refiner arguments; its custom_post sends A1111's own field names
    refined = api.custom_post("txt2img", {"prompt": "a fox", "width": 256, "height": 256,
                                          "steps": 4, "seed": 5, "refiner_checkpoint": "tiny-sdxl-refiner",
                                          "refiner_switch_at": 0.5}, baseurl=True)
    assert refined.images[0].size == (256, 256)
    assert "refiner" in refined.info["features_used"]


def test_progress_polling_sees_steps_and_a_preview_while_a_job_runs(api):
    seen: list[dict] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            seen.append(api.get_progress())
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = api.txt2img(prompt="a slow fox", width=256, height=256, steps=12, seed=2)
    finally:
        done.set()
        poller.join(timeout=10)
    assert result.images
    running = [p for p in seen if p["state"]["sampling_steps"]]
    assert running, "progress never showed a running job"
    assert all(0.0 <= p["progress"] <= 1.0 for p in seen)
    assert any(0 < p["progress"] < 1 for p in running)
    assert any(p["current_image"] for p in running), "no live preview in current_image"
    assert max(p["state"]["sampling_step"] for p in running) > 1


def test_models_samplers_and_the_default_checkpoint(api):
    # from the broker's list_models: every file in the models dir, loaded or not
    assert {"tiny-sdxl", "tiny-sdxl-refiner"} <= set(api.util_get_model_names())
    assert {"tiny-lora-a", "tiny-lora-b"} <= {lora["name"] for lora in api.get_loras()}
    assert "tiny-vae" in {vae["model_name"] for vae in api.get_sd_vae()}
    assert "Lanczos" in {u["name"] for u in api.get_upscalers()}
    assert "Euler a" in api.util_get_sampler_names()
    api.set_options({"sd_model_checkpoint": "tiny-sdxl"})
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"
