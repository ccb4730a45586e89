"""Every file a model load reads is checked before diffusers opens it: inside the model root
after resolving symlinks (sub-folders included), pickle-only weights refused file by file, and a
corrupt or truncated weight file is a validation_error naming the file."""

from __future__ import annotations

import os
import shutil

import pytest

from gpu_worker.model_resolver import ModelResolver
from protocol import constants as C
from protocol.errors import JobError


@pytest.fixture
def root(demo_models_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(os.path.join(demo_models_dir, "tiny-sdxl"), models / "tiny-sdxl")
    shutil.copytree(os.path.join(demo_models_dir, "loras"), models / "loras")
    return models


def refused(call, *args) -> str:
    with pytest.raises(JobError) as info:
        call(*args)
    assert info.value.code == C.VALIDATION_ERROR
    return info.value.message


def test_the_kit_passes(root):
    assert ModelResolver(str(root)).base("tiny-sdxl").path == os.path.realpath(root / "tiny-sdxl")


def test_a_weight_file_symlinked_out_of_the_root_is_refused(root, tmp_path):
    weights = root / "tiny-sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    message = refused(ModelResolver(str(root)).base, "tiny-sdxl")
    assert str(weights) in message and "outside the model root" in message


def test_a_sub_folder_symlinked_out_of_the_root_is_refused(root, tmp_path):
    shutil.move(root / "tiny-sdxl" / "vae", tmp_path / "vae")
    (root / "tiny-sdxl" / "vae").symlink_to(tmp_path / "vae")
    assert "outside the model root" in refused(ModelResolver(str(root)).base, "tiny-sdxl")


def test_a_truncated_weight_file_is_named(root):
    weights = root / "tiny-sdxl" / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    message = refused(ModelResolver(str(root)).base, "tiny-sdxl")
    assert str(weights) in message and "truncated" in message


def test_a_corrupt_lora_file_is_named(root):
    (root / "loras" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    message = refused(ModelResolver(str(root)).lora, "broken")
    assert "broken.safetensors" in message and "not a readable weight file" in message


def test_pickle_only_weights_are_refused_file_by_file(root):
    unet = root / "tiny-sdxl" / "unet"
    os.remove(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    message = refused(ModelResolver(str(root)).base, "tiny-sdxl")
    assert str(unet / "diffusion_pytorch_model.bin") in message and "--allow-pickle" in message
    assert ModelResolver(str(root), allow_pickle=True).base("tiny-sdxl").path.endswith("tiny-sdxl")
