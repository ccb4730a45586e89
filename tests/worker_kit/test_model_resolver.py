"""Model names resolve under the model root, and every way out of it is refused with a typed
error that says what was looked for where. Synthetic trees (no torch) plus the real kit."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from gpu_worker.model_resolver import ModelResolver
from protocol.errors import JobError

BASE_UNET = {"block_out_channels": [32, 64], "projection_class_embeddings_input_dim": 80}
OTHER_UNET = {"block_out_channels": [320, 640, 1280], "projection_class_embeddings_input_dim": 2816}


def write_safetensors(path, shapes: dict[str, list[int]]):
    """A valid .safetensors file of zeros with the given F32 tensor shapes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)


def sdxl_file(path, conv_width=32, label_in=80):
    write_safetensors(path, {"model.diffusion_model.input_blocks.0.0.weight": [conv_width, 4, 3, 3],
                             "model.diffusion_model.label_emb.0.0.weight": [8, label_in]})


def pipeline_folder(path, cls="StableDiffusionXLPipeline", unet=BASE_UNET, weights="diffusion_pytorch_model.safetensors"):
    os.makedirs(os.path.join(path, "unet"))
    with open(os.path.join(path, "model_index.json"), "w") as fh:
        json.dump({"_class_name": cls}, fh)
    with open(os.path.join(path, "unet", "config.json"), "w") as fh:
        json.dump({"_class_name": "UNet2DConditionModel", **unet}, fh)
    weight_file(os.path.join(path, "unet", weights))


def weight_file(path):
    """A small valid .safetensors (an empty one is refused as unreadable), or an empty pickle."""
    if path.endswith(".safetensors"):
        write_safetensors(path, {"w": [1]})
    else:
        open(path, "wb").close()


def component_folder(path, cls):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"_class_name": cls}, fh)
    weight_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "models"
    pipeline_folder(str(r / "base-a"))
    sdxl_file(str(r / "base-a.safetensors"))
    pipeline_folder(str(r / "refiner-a"), cls="StableDiffusionXLImg2ImgPipeline")
    component_folder(str(r / "vae-a"), "AutoencoderKL")
    component_folder(str(r / "vae" / "vae-b"), "AutoencoderKL")
    component_folder(str(r / "controlnet" / "my-canny-v1"), "ControlNetModel")
    component_folder(str(r / "controlnet" / "zoe-depth"), "ControlNetModel")
    write_safetensors(str(r / "loras" / "style.safetensors"), {"x": [1]})
    write_safetensors(str(r / "embeddings" / "emb.safetensors"), {"clip_l": [1, 32], "clip_g": [1, 64]})
    return str(r)


def expect_error(code, fn, *args, **kwargs) -> str:
    with pytest.raises(JobError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value.message


def test_each_kind_resolves(root):
    r = ModelResolver(root)
    base = r.base("base-a")
    assert (base.path, base.kind, base.single_file, base.config_path) == (os.path.join(root, "base-a"), "base", False, None)
    assert r.refiner("refiner-a").path == os.path.join(root, "refiner-a")
    assert r.vae("vae-a").path == os.path.join(root, "vae-a")
    assert r.vae("vae-b").path == os.path.join(root, "vae", "vae-b")
    assert r.controlnet("my-canny-v1").path == os.path.join(root, "controlnet", "my-canny-v1")
    lora = r.lora("style")
    assert (lora.name, lora.path, lora.single_file) == ("style", os.path.join(root, "loras", "style.safetensors"), True)
    assert r.textual_inversion("emb").path == os.path.join(root, "embeddings", "emb.safetensors")


def test_controlnet_by_type_picks_the_matching_folder(root):
    r = ModelResolver(root)
    canny = r.controlnet("canny")
    assert canny.path.endswith(os.path.join("controlnet", "my-canny-v1")) and canny.name == "my-canny-v1"
    assert r.controlnet("depth").name == "zoe-depth"
    message = expect_error("model_not_found", r.controlnet, "openpose")
    assert "controlnet/openpose" in message and "my-canny-v1" in message


def test_single_file_uses_its_sibling_folder_as_config(root):
    resolved = ModelResolver(root).base("base-a.safetensors")
    assert resolved.single_file and resolved.path == os.path.join(root, "base-a.safetensors")
    assert resolved.config_path == os.path.join(root, "base-a")


def test_single_file_finds_a_matching_folder_and_skips_a_different_architecture(root):
    sdxl_file(os.path.join(root, "merged.safetensors"))
    pipeline_folder(os.path.join(root, "aaa-big"), unet=OTHER_UNET)  # sorts first, must not be chosen
    assert ModelResolver(root).base("merged.safetensors").config_path == os.path.join(root, "base-a")


def test_single_file_without_any_matching_config_says_what_is_missing(tmp_path):
    r_dir = tmp_path / "m"
    sdxl_file(str(r_dir / "lonely.safetensors"), conv_width=320, label_in=2816)
    pipeline_folder(str(r_dir / "tiny"))  # different architecture
    message = expect_error("model_not_found", ModelResolver(str(r_dir)).base, "lonely.safetensors")
    assert "same architecture" in message and os.path.join(str(r_dir), "lonely") in message


def test_configured_single_file_config_is_preferred(root):
    pipeline_folder(os.path.join(root, "configs", "sdxl-config"))
    r = ModelResolver(root, single_file_config=os.path.join(root, "configs", "sdxl-config"))
    assert r.base("base-a.safetensors").config_path == os.path.join(root, "configs", "sdxl-config")


def test_paths_outside_the_root_are_refused(root, tmp_path):
    r = ModelResolver(root)
    outside = tmp_path / "outside.safetensors"
    write_safetensors(str(outside), {"x": [1]})
    assert "outside the model root" in expect_error("validation_error", r.base, "../outside.safetensors")
    assert "outside the model root" in expect_error("validation_error", r.base, str(outside))
    assert "outside the model root" in expect_error("validation_error", r.lora, "x", path=str(outside))
    assert "outside the model root" in expect_error("validation_error", r.lora, "../../outside")
    assert "outside the model root" in expect_error("validation_error", r.textual_inversion, "t", path="../outside.safetensors")


def test_a_symlink_pointing_out_of_the_root_is_refused(root, tmp_path):
    target = tmp_path / "elsewhere"
    pipeline_folder(str(target))
    os.symlink(str(target), os.path.join(root, "sneaky"))
    os.symlink(str(tmp_path / "x.safetensors"), os.path.join(root, "loras", "sneaky.safetensors"))
    r = ModelResolver(root)
    assert "outside the model root" in expect_error("validation_error", r.base, "sneaky")
    assert "outside the model root" in expect_error("validation_error", r.lora, "sneaky")


def test_absolute_and_explicit_paths_inside_the_root_are_fine(root):
    r = ModelResolver(root)
    assert r.base(os.path.join(root, "base-a")).path == os.path.join(root, "base-a")
    lora = r.lora("", path=os.path.join(root, "loras", "style.safetensors"))
    assert lora.name == "style" and lora.path.endswith("style.safetensors")
    assert r.lora("named", path="loras/style.safetensors").name == "named"  # relative to the root
    assert "not found" in expect_error("model_not_found", r.lora, "x", path="loras/missing.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_files_are_refused_unless_allowed(root, suffix):
    pickle_lora = os.path.join(root, "loras", "old" + suffix)
    open(pickle_lora, "wb").close()
    message = expect_error("validation_error", ModelResolver(root).lora, "old")
    assert "pickle" in message and "--allow-pickle" in message and pickle_lora in message
    expect_error("validation_error", ModelResolver(root).lora, "x", path=pickle_lora)
    assert ModelResolver(root, allow_pickle=True).lora("old").path == pickle_lora


def test_pickle_single_file_base_is_refused_unless_allowed(root):
    ckpt = os.path.join(root, "legacy.ckpt")
    open(ckpt, "wb").close()
    assert "pickle" in expect_error("validation_error", ModelResolver(root).base, "legacy")
    assert "pickle" in expect_error("validation_error", ModelResolver(root).base, "legacy.ckpt")
    allowed = ModelResolver(root, allow_pickle=True).base("legacy")
    assert allowed.path == ckpt and allowed.single_file and allowed.config_path == os.path.join(root, "base-a")


def test_a_folder_with_only_pickle_weights_is_refused_unless_allowed(root):
    pipeline_folder(os.path.join(root, "old-folder"), weights="diffusion_pytorch_model.bin")
    message = expect_error("validation_error", ModelResolver(root).base, "old-folder")
    assert "diffusion_pytorch_model.bin" in message
    assert ModelResolver(root, allow_pickle=True).base("old-folder").single_file is False


def test_hub_ids_that_are_not_local_are_model_not_found(root):
    message = expect_error("model_not_found", ModelResolver(root).base, "stabilityai/stable-diffusion-xl-base-1.0")
    assert f"not found under {root}" in message and "no model hub is reachable" in message
    # the same id laid out locally resolves
    pipeline_folder(os.path.join(root, "stabilityai", "stable-diffusion-xl-base-1.0"))
    assert ModelResolver(root).base("stabilityai/stable-diffusion-xl-base-1.0").single_file is False


def test_missing_names_list_what_exists(root):
    message = expect_error("model_not_found", ModelResolver(root).lora, "nope")
    assert os.path.join(root, "loras", "nope.safetensors") in message and "available: style" in message
    assert "base-a" in expect_error("model_not_found", ModelResolver(root).base, "nope")


def test_wrong_kind_and_bad_names(root):
    r = ModelResolver(root)
    assert "no config.json" in expect_error("model_not_found", r.vae, "base-a")
    assert "no model_index.json" in expect_error("model_not_found", r.base, "vae-a")
    expect_error("validation_error", r.base, "")
    expect_error("validation_error", r.lora, "   ")
    expect_error("validation_error", r.base, "bad\x00name")
    component_folder(os.path.join(root, "sd15"), "AutoencoderKL")
    with open(os.path.join(root, "sd15", "model_index.json"), "w") as fh:
        json.dump({"_class_name": "StableDiffusionPipeline"}, fh)
    assert "not an SDXL" in expect_error("validation_error", r.base, "sd15")


def test_available_lists_each_kind(root):
    found = ModelResolver(root).available()
    assert found["base"] == ["base-a", "base-a.safetensors"]
    assert found["refiner"] == ["refiner-a"]
    assert found["vae"] == ["vae-a", "vae-b"]  # vae/vae-b too: every folder a name is found in is listed
    assert found["controlnet"] == ["my-canny-v1", "zoe-depth"]
    assert found["lora"] == ["style"] and found["textual_inversion"] == ["emb"]


def test_resolving_never_imports_torch(root):
    code = ("import sys; from gpu_worker.model_resolver import ModelResolver; "
            f"r = ModelResolver({root!r}); r.base('base-a.safetensors'); r.lora('style'); r.controlnet('canny'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_every_kit_name_resolves(demo_models_dir):
    r = ModelResolver(demo_models_dir)
    d = os.path.realpath(demo_models_dir)
    assert r.base("tiny-sdxl").path == os.path.join(d, "tiny-sdxl")
    single = r.base("tiny-sdxl.safetensors")
    assert single.single_file and single.config_path == os.path.join(d, "tiny-sdxl")
    assert r.refiner("tiny-sdxl-refiner").path == os.path.join(d, "tiny-sdxl-refiner")
    assert r.vae("tiny-vae").path == os.path.join(d, "tiny-vae")
    assert r.controlnet("tiny-canny").path == r.controlnet("canny").path == os.path.join(d, "controlnet", "tiny-canny")
    assert r.controlnet("depth").name == "tiny-depth"
    assert r.lora("tiny-lora-a").path == os.path.join(d, "loras", "tiny-lora-a.safetensors")
    assert r.lora("tiny-lora-b").path == os.path.join(d, "loras", "tiny-lora-b.safetensors")
    assert r.textual_inversion("tiny-ti").path == os.path.join(d, "embeddings", "tiny-ti.safetensors")


def test_hub_ids_are_found_in_a_hugging_face_cache_layout(root):
    repo = os.path.join(root, "models--stabilityai--sdxl-base")
    pipeline_folder(os.path.join(repo, "snapshots", "abc123"))
    pipeline_folder(os.path.join(repo, "snapshots", "old000"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write("abc123\n")
    resolved = ModelResolver(root).base("stabilityai/sdxl-base")
    assert resolved.path == os.path.join(repo, "snapshots", "abc123") and not resolved.single_file
