"""Image inputs and output files, without diffusers (fast)."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from gpu_worker import postprocess
from gpu_worker.images import canny_edges, decode_image
from protocol import rule_texts as R
from gpu_worker.schedulers import make_scheduler
from protocol import constants as C
from protocol.errors import JobError


def _png(color=(10, 200, 30), size=(32, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_bytes_base64_data_uri_and_path(tmp_path):
    data = _png()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "in.png").write_bytes(data)
    text = base64.b64encode(data).decode()
    for ref in (data, text, "data:image/png;base64," + text, "sub/in.png", str(tmp_path / "sub" / "in.png")):
        image = decode_image(ref, input_dir=str(tmp_path), field="init_image")
        assert image.size == (32, 16) and image.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("ref, needle", [
    ("../outside.png", "outside the input root"),
    ("/etc/passwd", "outside the input root"),
    ("missing.png", "no image file"),
    (b"not an image", "not a readable image"),
    ("data:image/png;base64,!!!!", "base64"),
    ("", "must be a path, a base64 string"),
])
def test_bad_image_inputs_are_validation_errors(tmp_path, ref, needle):
    with pytest.raises(JobError) as info:
        decode_image(ref, input_dir=str(tmp_path), field="mask_image")
    assert info.value.code == C.VALIDATION_ERROR
    assert needle in info.value.message and "mask_image" in info.value.message
    # the errors[] entry carries the rule's words (protocol.rule_texts), the field beside them
    [entry] = info.value.details["errors"]
    assert entry["field"] == "mask_image" and R.matching(entry["message"]) is not None


def test_paths_refused_without_an_input_root():
    with pytest.raises(JobError) as info:
        decode_image("in.png", input_dir=None, field="init_image")
    assert info.value.code == C.VALIDATION_ERROR


def test_canny_edges_finds_the_square():
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    edges = canny_edges(image)
    assert edges.mode == "RGB" and max(edges.getpixel((x, 30))[0] for x in (15, 16)) == 255 and edges.getpixel((30, 30))[0] == 0


def test_png_parameters_unique_names_and_save_path_root(tmp_path):
    text = postprocess.a1111_parameters(prompt="a cat", negative_prompt="blurry", steps=4,
                                        scheduler="EulerAncestralDiscreteScheduler", use_karras_sigmas=False,
                                        guidance_scale=7.5, seed=42, width=256, height=256, model="tiny-sdxl")
    assert text == "a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 256x256, Model: tiny-sdxl"
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    first = postprocess.finish_image(image, output_dir=str(tmp_path), save_path="outputs/run1", fmt="png",
                                     quality=95, stem="same", parameters=text)
    second = postprocess.finish_image(image, output_dir=str(tmp_path), save_path="outputs/run1", fmt="png",
                                      quality=95, stem="same", parameters=text)
    assert first.path != second.path and first.sha256 == second.sha256
    # a leading outputs/ is the output root itself (README "Where images go")
    assert os.path.dirname(first.path) == os.path.realpath(tmp_path / "run1")
    assert Image.open(first.path).text["parameters"] == text
    for escape in ("../x", "/tmp", "a/../../x"):
        with pytest.raises(JobError) as info:
            postprocess.output_folder(str(tmp_path), escape)
        assert info.value.code == C.VALIDATION_ERROR


def test_quality_changes_jpeg_and_webp_size():
    image = Image.effect_noise((64, 64), 50).convert("RGB")
    for fmt in ("jpeg", "webp"):
        small = postprocess.encode_image(image, fmt, 10, None)
        large = postprocess.encode_image(image, fmt, 95, None)
        assert len(small) < len(large)


def test_upscale_lanczos_and_unsupported_methods():
    image = Image.new("RGB", (10, 8))
    assert postprocess.upscale(image, 2.0).size == (20, 16)
    # any other method runs the model upscaler it is given, then Lanczos to the exact factor
    assert postprocess.upscale(image, 2.0, "tiny", lambda small: small.resize((40, 32))).size == (20, 16)
    with pytest.raises(JobError) as info:
        postprocess.upscale(image, 9.0)
    assert info.value.code == C.VALIDATION_ERROR


def test_schedulers_from_config_with_karras():
    from diffusers import EulerDiscreteScheduler

    config = EulerDiscreteScheduler().config
    scheduler, warnings = make_scheduler("DPMSolverMultistepScheduler", config, use_karras_sigmas=True)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.use_karras_sigmas
    assert not warnings
    _, warnings = make_scheduler("DDIMScheduler", config, use_karras_sigmas=True)
    assert warnings and "Karras" in warnings[0]
    with pytest.raises(JobError) as info:
        make_scheduler("NoSuchScheduler", config)
    assert info.value.code == C.VALIDATION_ERROR
