"""Single files as users have them, over a real `serve` with a real cpu worker, offline and with
nothing configured: a model root holding only one-file models (the kit's single-file base, a
single-file refiner, the kit's original-layout single-file ControlNet) generates. Their configs
are the ones the product ships, sized from the tensors: the config cache shows them written."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.serve.conftest import one_cpu_worker_argv

pytestmark = pytest.mark.slow


@pytest.fixture
def lone_files_root(demo_models_dir, tmp_path):
    """Stable-diffusion/ with the base and a refiner as single files, ControlNet/ with the
    kit's original-layout file and, for comparison, the same ControlNet as a folder and its
    base folder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from gpu_worker.ldm_layout import sdxl_refiner_to_single_file

    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"), root / "Stable-diffusion" / "base.safetensors")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(os.path.join(demo_models_dir, "tiny-sdxl-refiner"))
    save_file(sdxl_refiner_to_single_file(refiner.unet, refiner.vae, refiner.text_encoder_2),
              str(root / "Stable-diffusion" / "refiner.safetensors"), metadata={"format": "pt"})
    (root / "ControlNet").mkdir()
    shutil.copy(os.path.join(demo_models_dir, "controlnet", "tiny-canny-original.safetensors"),
                root / "ControlNet" / "canny-file.safetensors")
    shutil.copytree(os.path.join(demo_models_dir, "controlnet", "tiny-canny"), root / "ControlNet" / "canny-folder")
    # the base the kit's ControlNets were made from, as a folder (elsewhere than the single
    # files: a folder beside them would serve as their config)
    shutil.copytree(os.path.join(demo_models_dir, "tiny-sdxl"), root / "diffusers" / "tiny-sdxl")
    return root


def _control_png() -> bytes:
    array = np.zeros((256, 256, 3), np.uint8)
    array[64:192, 64:192] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(result) -> np.ndarray:
    with Image.open(result.images[0].path) as image:
        return np.asarray(image.convert("RGB"))


def test_single_file_base_refiner_and_controlnet_generate_offline(start_serve, lone_files_root, tmp_path, monkeypatch):
    from clients.client import BrokerClient

    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))   # where the worker writes shipped configs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sp = start_serve(one_cpu_worker_argv(lone_files_root, tmp_path / "images", tmp_path), ready_timeout_s=180)
    common = dict(prompt="a lighthouse at dusk", model_base="base.safetensors", width=256, height=256,
                  steps=4, seed=11, guidance_scale=5.0)
    control = dict(controlnet_types=["canny"], controlnet_images=[_control_png()],
                   controlnet_preprocess=[False])
    with BrokerClient(sp.endpoint, timeout_s=300) as client:
        plain = client.generate(**common)
        stages: list[str] = []
        refined = client.generate(**common, model_refiner="refiner.safetensors", refiner_switch=0.5,
                                  stream=True, on_progress=lambda event: stages.append(event["stage"]))
        base_half = client.generate(**common, refiner_switch=0.5)
        from_file = client.generate(**common, **control, controlnet_models=["canny-file"])
        # with the base it was made from: the file gives the folder's image exactly
        kit_base = {**common, "model_base": "tiny-sdxl"}
        file_on_kit_base = client.generate(**kit_base, **control, controlnet_models=["canny-file"])
        folder_on_kit_base = client.generate(**kit_base, **control, controlnet_models=["canny-folder"])
    assert sp.stop() == 0

    info = refined.reply["data"]["processing_metrics"]["model_info"]
    assert info["refiner"] == "refiner.safetensors"
    assert "refining" in stages
    assert not np.array_equal(_pixels(base_half), _pixels(refined))      # the refiner changed it
    assert [c["name"] for c in from_file.reply["data"]["processing_metrics"]["model_info"]["controlnets"]] \
        == ["canny-file"]
    assert not np.array_equal(_pixels(plain), _pixels(from_file))        # the ControlNet acted
    # every weight in place, and the config the tensors and the base give: the folder's image
    assert np.array_equal(_pixels(file_on_kit_base), _pixels(folder_on_kit_base))
    # shipped configs written: the base's, the refiner's, the ControlNet's for each base it ran with
    written = sorted(entry.split("-")[1] for entry in os.listdir(cache / "sdxl-broker" / "single-file-configs"))
    assert written == ["base", "controlnet", "controlnet", "refiner"], written
