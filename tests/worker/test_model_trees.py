"""--models-dir pointed at an existing A1111 or ComfyUI `models/` tree finds every kind in its
own folders, without renaming anything; a job using each kind runs for real."""

from __future__ import annotations

import os
import shutil

import pytest

from gpu_worker.model_resolver import ModelResolver
from protocol.job import Job

pytestmark = pytest.mark.slow

A1111 = {"Stable-diffusion/my-sdxl.safetensors": "tiny-sdxl.safetensors",
         "Lora/tiny-lora-kohya.safetensors": "loras/tiny-lora-kohya.safetensors",
         "embeddings/tiny-ti.safetensors": "embeddings/tiny-ti.safetensors",
         "VAE/tiny-vae": "tiny-vae",
         "ESRGAN/tiny-esrgan.safetensors": "upscalers/tiny-esrgan.safetensors"}
COMFYUI = {"checkpoints/my-sdxl.safetensors": "tiny-sdxl.safetensors",
           "loras/tiny-lora-kohya.safetensors": "loras/tiny-lora-kohya.safetensors",
           "embeddings/tiny-ti.safetensors": "embeddings/tiny-ti.safetensors",
           "vae/tiny-vae": "tiny-vae",
           "controlnet/tiny-canny": "controlnet/tiny-canny",
           "upscale_models/tiny-esrgan.safetensors": "upscalers/tiny-esrgan.safetensors"}


def build_tree(kit: str, root, layout: dict) -> str:
    for target, source in layout.items():
        destination = os.path.join(root, target)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        (shutil.copytree if os.path.isdir(os.path.join(kit, source)) else shutil.copy)(
            os.path.join(kit, source), destination)
    return str(root)


@pytest.mark.parametrize("layout,controlnet", [(A1111, False), (COMFYUI, True)], ids=["a1111", "comfyui"])
def test_a_job_using_every_kind_runs_on_the_tree_as_it_is(demo_models_dir, tmp_path, structured_image,
                                                          layout, controlnet, monkeypatch):
    monkeypatch.setenv("SDXL_BROKER_CONFIG_CACHE", str(tmp_path / "config-cache"))
    from gpu_worker.executor import DiffusersExecutor

    root = build_tree(demo_models_dir, tmp_path / "models", layout)
    available = ModelResolver(root).available()
    assert "my-sdxl.safetensors" in available["base"] and "tiny-lora-kohya" in available["lora"]
    assert "tiny-vae" in available["vae"] and "tiny-ti" in available["textual_inversion"]
    executor = DiffusersExecutor("cpu", models_dir=root, output_dir=str(tmp_path / "out"),
                                 input_dir=str(tmp_path))  # the lone checkpoint needs no config folder
    fields = dict(request_id="tree", prompt="a photo of a <tiny-ti> cat", models={"base": "my-sdxl", "vae": "tiny-vae"},
                  width=256, height=256, steps=2, seed=1, precision={"dtype": "float32"},
                  scheduler="EulerDiscreteScheduler", loras=[{"name": "tiny-lora-kohya", "weight": 0.5}],
                  textual_inversions=[{"name": "tiny-ti", "token": "<tiny-ti>"}],
                  postprocess={"upscale_factor": 2, "upscale_method": "tiny-esrgan"})
    if controlnet:
        fields["controlnets"] = [{"type": "canny", "image": structured_image}]
    result = executor.run(Job.model_validate(fields), lambda *a: None, lambda: False)
    info = result["processing_metrics"]["model_info"]
    assert info["loras"][0]["name"] == "tiny-lora-kohya" and info["vae"] == "tiny-vae"
    assert info["upscaler"] == "tiny-esrgan" and result["generated_images"][0]["width"] == 512
    assert {"lora", "textual_inversion", "custom_vae", "upscale_realesrgan"} <= set(result["features_used"])
    if controlnet:
        assert info["controlnets"][0]["name"] == "tiny-canny"
