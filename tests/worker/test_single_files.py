"""Single-file SDXL checkpoints as users have them, offline: no sibling folder; configs from
--single-file-config, else written from the file's tensors with the configs the product ships
(CLIP tokenizers from open_clip's vocabulary); single-file VAEs too; a clear error otherwise.
The hub is never asked here (HF_HUB_OFFLINE=1); only that it would be is checked."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gpu_worker.model_resolver import ModelResolver
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def config_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_BROKER_CONFIG_CACHE", str(tmp_path / "config-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def lone_file_root(demo_models_dir, tmp_path):
    """A model root holding the kit's single-file base and a single-file VAE, nothing else."""
    from diffusers import AutoencoderKL

    from gpu_worker.ldm_layout import vae_to_ldm

    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"), root / "Stable-diffusion" / "lone.safetensors")
    vae = AutoencoderKL.from_pretrained(os.path.join(demo_models_dir, "tiny-vae"))
    (root / "VAE").mkdir()
    save_file(vae_to_ldm(vae.state_dict(), dict(vae.config)), str(root / "VAE" / "lone-vae.safetensors"))
    return str(root)


def weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def run(executor, **fields) -> dict:
    job = Job.model_validate({**dict(request_id="sf", prompt="a photo of a cat", models={"base": "lone"},
                                     width=256, height=256, steps=2, seed=3, precision={"dtype": "float32"},
                                     scheduler="EulerDiscreteScheduler"), **fields})
    return executor.run(job, lambda *a: None, lambda: False)


def test_lone_base_file_loads_offline_from_shipped_configs(lone_file_root, demo_models_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from gpu_worker.executor import DiffusersExecutor

    resolved = ModelResolver(lone_file_root).base("lone")
    assert resolved.single_file and resolved.config_path.startswith(str(tmp_path / "config-cache"))
    assert not os.path.exists(resolved.config_path)  # resolving only names it; the load writes it
    from gpu_worker.model_resolver import ensure_config_folder
    ensure_config_folder(resolved.path, resolved.config_path)
    assert sorted(os.listdir(resolved.config_path)) == ["model_index.json", "scheduler", "text_encoder",
                                                        "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
    single = StableDiffusionXLPipeline.from_single_file(resolved.path, config=resolved.config_path,
                                                        local_files_only=True)
    folder = StableDiffusionXLPipeline.from_pretrained(os.path.join(demo_models_dir, "tiny-sdxl"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert weights_equal(getattr(single, name), getattr(folder, name)), name  # every weight in place
    assert single.tokenizer("a photo of a cat").input_ids == folder.tokenizer("a photo of a cat").input_ids
    executor = DiffusersExecutor("cpu", models_dir=lone_file_root, output_dir=str(tmp_path / "out"),
                                 input_dir=str(tmp_path))
    result = run(executor, models={"base": "lone", "vae": "lone-vae"})
    image = np.asarray(Image.open(result["generated_images"][0]["path"]))
    assert image.shape == (256, 256, 3) and image.std() > 1.0
    assert result["processing_metrics"]["model_info"]["vae"] == "lone-vae"


def test_single_file_vae_loads_offline_with_its_weights(lone_file_root, demo_models_dir):
    from diffusers import AutoencoderKL

    path = os.path.join(lone_file_root, "VAE", "lone-vae.safetensors")
    config, subfolder = ModelResolver(lone_file_root).vae_config(path)
    assert subfolder is None and os.path.isfile(os.path.join(config, "config.json"))
    single = AutoencoderKL.from_single_file(path, config=config, local_files_only=True)
    assert weights_equal(single, AutoencoderKL.from_pretrained(os.path.join(demo_models_dir, "tiny-vae")))


def test_single_file_config_setting_wins_and_reproduces_the_folder(lone_file_root, demo_models_dir, tmp_path):
    from gpu_worker.executor import DiffusersExecutor

    shutil.copytree(os.path.join(demo_models_dir, "tiny-sdxl"), os.path.join(lone_file_root, "configs", "sdxl"))
    resolver = ModelResolver(lone_file_root, single_file_config="configs/sdxl")
    assert resolver.base("lone").config_path == os.path.realpath(os.path.join(lone_file_root, "configs", "sdxl"))
    out = str(tmp_path / "out")
    executor = DiffusersExecutor("cpu", models_dir=lone_file_root, output_dir=out, input_dir=out,
                                 single_file_config="configs/sdxl")
    from_file = np.asarray(Image.open(run(executor)["generated_images"][0]["path"]))
    from_folder = np.asarray(Image.open(run(executor, models={"base": "configs/sdxl"})["generated_images"][0]["path"]))
    assert np.array_equal(from_file, from_folder)


def test_hub_is_the_source_only_when_the_environment_allows_it(lone_file_root, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # no config folder: diffusers would read the configs from the HF cache/hub (not called here)
    assert ModelResolver(lone_file_root).base("lone").config_path is None


def test_no_option_applies_says_which_to_take(tmp_path, demo_models_dir):
    root = tmp_path / "models"
    root.mkdir()
    tensors = load_file(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"))
    # an SD 1.x-like file: a UNet without SDXL's text-time embedding
    save_file({k: v for k, v in tensors.items() if "label_emb" not in k}, str(root / "sd15.safetensors"))
    with pytest.raises(JobError) as info:
        ModelResolver(str(root)).base("sd15")
    message = info.value.message
    assert info.value.code == C.MODEL_NOT_FOUND
    assert "--single-file-config" in message and "HF_HUB_OFFLINE" in message and "sd15/" in message


# --- single-file ControlNets -------------------------------------------------------------------

def _kit_controlnet(demo_models_dir):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(os.path.join(demo_models_dir, "controlnet", "tiny-canny"))


def _base_unet_config(demo_models_dir) -> dict:
    import json

    with open(os.path.join(demo_models_dir, "tiny-sdxl", "unet", "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_the_kits_original_layout_controlnet_is_what_diffusers_converter_reads(demo_models_dir):
    """The kit writes tiny-canny in the original ControlNet (cldm) layout with the product's
    writer (diffusers ships no diffusers -> original converter); diffusers' own converter,
    the inverse, gives back every folder weight, except the text-time embedding it does not
    map (label_emb -> add_embedding: gpu_worker/controlnet_files.py fills that gap)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    path = os.path.join(demo_models_dir, "controlnet", "tiny-canny-original.safetensors")
    tensors = load_file(path)
    assert all(k.startswith("control_model.") for k in tensors)
    assert "control_model.input_hint_block.0.weight" in tensors and "control_model.zero_convs.0.0.weight" in tensors
    folder = _kit_controlnet(demo_models_dir)
    converted = convert_controlnet_checkpoint(tensors, dict(folder.config))
    reference = folder.state_dict()
    assert set(reference) - set(converted) == {f"add_embedding.linear_{i}.{p}" for i in (1, 2)
                                               for p in ("weight", "bias")}
    assert all(torch.equal(converted[k], reference[k]) for k in converted)
    assert torch.equal(tensors["control_model.label_emb.0.0.weight"], reference["add_embedding.linear_1.weight"])


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_lone_controlnet_file_loads_offline_from_shipped_configs(layout, demo_models_dir, tmp_path):
    """No folder beside it, nothing configured, offline: the config comes from the tensors
    (and the base UNet for what they do not show) and every weight lands in place."""
    from gpu_worker.controlnet_files import load_controlnet_file

    root = tmp_path / "models"
    (root / "ControlNet").mkdir(parents=True)   # A1111's folder name
    source = (os.path.join(demo_models_dir, "controlnet", "tiny-canny-original.safetensors") if layout == "original"
              else os.path.join(demo_models_dir, "controlnet", "tiny-canny", "diffusion_pytorch_model.safetensors"))
    shutil.copy(source, root / "ControlNet" / "my-canny.safetensors")
    resolver = ModelResolver(str(root))
    resolved = resolver.controlnet("my-canny")
    assert resolved.single_file and resolved.name == "my-canny"
    assert resolver.controlnet("canny").path == resolved.path          # found by its type, too
    assert "my-canny" in resolver.available()["controlnet"]
    config = resolver.controlnet_config(resolved.path, _base_unet_config(demo_models_dir))
    assert config.startswith(str(tmp_path / "config-cache"))
    model = load_controlnet_file(resolved.path, config, torch.float32)
    assert weights_equal(model, _kit_controlnet(demo_models_dir))
    assert dict(model.config)["attention_head_dim"] == list(_kit_controlnet(demo_models_dir).config.attention_head_dim)


def test_controlnet_file_config_from_the_setting_or_a_sibling_folder_and_refusals(demo_models_dir, tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "controlnet").mkdir(parents=True)
    shutil.copy(os.path.join(demo_models_dir, "controlnet", "tiny-canny-original.safetensors"),
                root / "controlnet" / "cn.safetensors")
    path = str(root / "controlnet" / "cn.safetensors")
    shutil.copytree(os.path.join(demo_models_dir, "controlnet", "tiny-depth"), root / "configs" / "sdxl" / "controlnet")
    configured = ModelResolver(str(root), single_file_config="configs/sdxl")
    assert configured.controlnet_config(path) == os.path.realpath(root / "configs" / "sdxl" / "controlnet")
    shutil.copytree(os.path.join(demo_models_dir, "controlnet", "tiny-depth"), root / "controlnet" / "cn")
    assert ModelResolver(str(root)).controlnet_config(path) == os.path.realpath(root / "controlnet" / "cn")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    shutil.rmtree(root / "controlnet" / "cn")
    assert ModelResolver(str(root)).controlnet_config(path) is None   # diffusers would ask the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a base checkpoint put among the ControlNets is refused, saying why
    shutil.copy(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"), root / "controlnet" / "oops.safetensors")
    with pytest.raises(JobError) as info:
        ModelResolver(str(root)).controlnet_config(str(root / "controlnet" / "oops.safetensors"))
    assert info.value.code == C.VALIDATION_ERROR and "not a ControlNet" in info.value.message
    # single files are looked for in the ControlNet folders only, not at the root
    shutil.copy(path, root / "rootcn.safetensors")
    with pytest.raises(JobError) as info:
        ModelResolver(str(root)).controlnet("rootcn")
    assert info.value.code == C.MODEL_NOT_FOUND
