"""Every output format carries the A1111 infotext, read back with sd-parsers (PyPI), not with
the product's own code: PNG `parameters`, JPEG and WebP EXIF UserComment; `Model hash` and
`Lora hashes` are A1111 short hashes (first 10 hex digits of the file's sha256)."""

from __future__ import annotations

import hashlib
import os

import pytest
from sd_parsers import ParserManager

from gpu_worker import file_hashes
from protocol.job import Job

pytestmark = pytest.mark.slow


def sha10(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:10]


def run(executor, **fields) -> dict:
    job = Job.model_validate({**dict(request_id="meta", prompt="a photo of a cat", negative_prompt="blurry",
                                     models={"base": "tiny-sdxl.safetensors"}, width=256, height=256, steps=2,
                                     seed=11, scheduler="DPMSolverMultistepScheduler", use_karras_sigmas=True,
                                     precision={"dtype": "float32"}), **fields})
    return executor.run(job, lambda *a: None, lambda: False)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_carries_the_infotext_with_a1111_hashes(executor, demo_models_dir, fmt):
    result = run(executor, output={"format": fmt, "quality": 90},
                 loras=[{"name": "tiny-lora-a", "weight": 0.7}], models={"base": "tiny-sdxl.safetensors",
                                                                         "vae": "tiny-vae"})
    image = result["generated_images"][0]
    assert image["format"] == fmt
    info = ParserManager().parse(image["path"])
    assert info is not None, f"sd-parsers found no parameters in the {fmt} file"
    assert info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "2"
    assert sampler.model.name == "tiny-sdxl.safetensors"
    assert sampler.model.hash == sha10(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"))
    assert info.full_prompt == "a photo of a cat <lora:tiny-lora-a:0.7>"
    assert info.full_negative_prompt == "blurry"
    lora_hash = sha10(os.path.join(demo_models_dir, "loras", "tiny-lora-a.safetensors"))
    vae_hash = sha10(os.path.join(demo_models_dir, "tiny-vae", "diffusion_pytorch_model.safetensors"))
    assert info.metadata["VAE hash"] == vae_hash
    assert info.metadata["Hashes"] == {"model": sampler.model.hash, "vae": vae_hash, "lora:tiny-lora-a": lora_hash}
    # A1111's own LoRA field (sd-parsers keeps the raw text; its key: value split drops quoted values)
    assert f'Lora hashes: "tiny-lora-a: {lora_hash}"' in info.raw_parameters["parameters"]
    assert result["processing_metrics"]["model_info"]["loras"][0]["hash"] == lora_hash


def test_short_hash_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"one")
    first = file_hashes.short_hash(str(path))
    assert first == hashlib.sha256(b"one").hexdigest()[:10]
    size = file_hashes.cache_size()
    assert file_hashes.short_hash(str(path)) == first and file_hashes.cache_size() == size  # cached
    path.write_bytes(b"two!")  # replaced in place: new size and mtime, hashed again
    os.utime(path, ns=(1, 1))
    assert file_hashes.short_hash(str(path)) == hashlib.sha256(b"two!").hexdigest()[:10]
