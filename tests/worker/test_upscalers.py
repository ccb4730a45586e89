"""Model upscalers for real: the kit's tiny 4x ESRGAN loaded by spandrel, picked by name or as
the `realesrgan` default, tiled for large images, .pth only with --allow-pickle."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from gpu_worker import upscalers
from gpu_worker.model_resolver import ModelResolver
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow


def run(executor, **postprocess) -> dict:
    job = Job.model_validate(dict(request_id="up", prompt="a photo of a cat", models={"base": "tiny-sdxl"},
                                  width=256, height=256, steps=2, seed=5, precision={"dtype": "float32"},
                                  scheduler="EulerDiscreteScheduler", postprocess=postprocess))
    return executor.run(job, lambda *a: None, lambda: False)


def test_kit_upscaler_is_an_esrgan_that_spandrel_recognises(demo_models_dir):
    descriptor = upscalers.load(os.path.join(demo_models_dir, "upscalers", "tiny-esrgan.safetensors"))
    assert descriptor.architecture.id == "ESRGAN" and descriptor.scale == 4 and descriptor.purpose == "SR"


@pytest.mark.parametrize("method", ["realesrgan", "tiny-esrgan"])
def test_upscale_by_default_alias_and_by_name(executor, method):
    result = run(executor, upscale_factor=2, upscale_method=method)
    image = result["generated_images"][0]
    assert (image["width"], image["height"]) == (512, 512)
    assert Image.open(image["path"]).size == (512, 512)
    assert "upscale_realesrgan" in result["features_used"]
    assert result["processing_metrics"]["model_info"]["upscaler"] == "tiny-esrgan"
    assert "Postprocess upscaler: tiny-esrgan" in Image.open(image["path"]).text["parameters"]


def test_model_upscale_differs_from_lanczos(executor):
    lanczos = run(executor, upscale_factor=2, upscale_method="lanczos")["generated_images"][0]
    model = run(executor, upscale_factor=2, upscale_method="realesrgan")["generated_images"][0]
    a = np.asarray(Image.open(lanczos["path"]), dtype=np.int16)
    b = np.asarray(Image.open(model["path"]), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0


def test_tiles_give_the_same_image_as_one_pass(demo_models_dir):
    descriptor = upscalers.load(os.path.join(demo_models_dir, "upscalers", "tiny-esrgan.safetensors"))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (72, 100, 3), dtype=np.uint8))
    whole = np.asarray(upscalers.run_tiled(descriptor, image, tile_px=1000), dtype=np.int16)
    tiled = np.asarray(upscalers.run_tiled(descriptor, image, tile_px=32, overlap_px=16), dtype=np.int16)
    assert whole.shape == tiled.shape == (288, 400, 3)
    # the receptive field of the 1-block network is within the overlap: tiles match the whole
    assert np.abs(whole - tiled).max() <= 1


def test_choice_rules_and_pickle(tmp_path, demo_models_dir):
    root = tmp_path / "models"
    (root / "ESRGAN").mkdir(parents=True)
    (root / "upscale_models").mkdir()
    kit_file = os.path.join(demo_models_dir, "upscalers", "tiny-esrgan.safetensors")
    shutil.copy(kit_file, root / "ESRGAN" / "a1111-4x.safetensors")
    shutil.copy(kit_file, root / "upscale_models" / "comfy-4x.safetensors")
    (root / "upscale_models" / "old-4x.pth").write_bytes(b"not really a pickle")
    library = upscalers.Upscalers(ModelResolver(str(root)))
    assert library.available() == ["a1111-4x", "comfy-4x"]
    # what the worker reports for the broker to decide on (Telemetry.upscalers): the alias only
    # where the default resolves (configured, or the only file)
    assert library.request_names() == ["a1111-4x", "comfy-4x"]
    assert upscalers.Upscalers(ModelResolver(str(root)), default="comfy-4x").request_names() == \
        ["realesrgan", "a1111-4x", "comfy-4x"]
    assert upscalers.Upscalers(ModelResolver(demo_models_dir)).request_names() == ["realesrgan", "tiny-esrgan"]
    assert library.resolve("comfy-4x")[0] == "comfy-4x"
    assert library.resolve("ESRGAN/a1111-4x.safetensors")[0] == "a1111-4x"
    with pytest.raises(JobError) as info:  # two and no default: say which to name
        library.resolve("realesrgan")
    assert info.value.code == C.UNSUPPORTED_FEATURE and "a1111-4x, comfy-4x" in info.value.message
    assert upscalers.Upscalers(ModelResolver(str(root)), default="comfy-4x").resolve("RealESRGAN")[0] == "comfy-4x"
    with pytest.raises(JobError) as info:
        library.resolve("old-4x")
    assert info.value.code == C.VALIDATION_ERROR and "--allow-pickle" in info.value.message
    allowed = upscalers.Upscalers(ModelResolver(str(root), allow_pickle=True))
    assert "old-4x" in allowed.available() and allowed.resolve("old-4x")[1].endswith("old-4x.pth")
    with pytest.raises(JobError) as info:
        library.resolve("../../etc/passwd.pth")
    assert info.value.code == C.VALIDATION_ERROR and "outside the model root" in info.value.message
    with pytest.raises(JobError) as info:
        upscalers.Upscalers(ModelResolver(str(tmp_path / "empty"))).resolve("realesrgan")
    assert info.value.code == C.UNSUPPORTED_FEATURE and "upscalers" in info.value.message
